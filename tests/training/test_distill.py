"""Offline distillation: batching, learning, checkpoint and exact resume, labels handling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from broadfast.model.student import pair_texts
from broadfast.training.distill import TrainConfig, bucketed_batches, train_offline_frame
from broadfast.model.errors import CheckpointError, LabelsError
from broadfast.training.losses import LossConfig
from broadfast.model.student import StudentConfig, load_student
from broadfast.training.targets import human_targets, label_targets, read_labels, relevance_to_probs

from .conftest import make_labels


def test_bucketed_batches_cover_every_pair_once_and_pad_little() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=1000).astype(np.int32)
    batches = bucketed_batches(lengths, 32, seed=1, epoch=0, bucket_factor=10)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    padded = sum(len(b) * lengths[b].max() for b in batches)
    naive = sum(len(b) * lengths[b].max() for b in np.array_split(rng.permutation(1000), len(batches)))
    assert padded < 0.75 * naive  # bucketing saves padding
    again = bucketed_batches(lengths, 32, seed=1, epoch=0, bucket_factor=10)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))  # deterministic: resumable
    other = bucketed_batches(lengths, 32, seed=1, epoch=1, bucket_factor=10)
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other))  # reshuffled each epoch


def test_relevance_targets_keep_the_expected_score_linear() -> None:
    rel = np.array([1.0, 1.33, 2.0, 2.67, 3.0])
    probs = relevance_to_probs(rel, 1.0, 3.0)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    score = probs[:, 2] + 0.5 * probs[:, 1]
    np.testing.assert_allclose(score, (rel - 1.0) / 2.0, atol=1e-6)


def _kl_to_teacher(student, df: pd.DataFrame, teacher: np.ndarray) -> float:
    q, t = pair_texts(df)
    p = student.predict_proba(q, t)
    return float((teacher * (np.log(teacher + 1e-8) - np.log(p + 1e-8))).sum(1).mean())


def test_training_moves_the_student_toward_the_teacher(pairs: pd.DataFrame, tmp_path: Path) -> None:
    labels = read_labels_frame(pairs, tmp_path)
    rows, targets = label_targets(pairs, labels, k=3, dim=384)
    assert targets.has_rationale.all() and targets.rationale.shape == (48, 3, 384)
    cfg = TrainConfig(epochs=10, batch_size=8, lr=3e-3, head_lr=3e-3, warmup=0.0, progress=False, loss=LossConfig(temperature=1.0))
    student, report = train_offline_frame(rows, targets, cfg, StudentConfig.tiny(dropout=0.0), tmp_path / "out", eval_df=pairs)
    before = load_student_fresh()
    after_kl, before_kl = _kl_to_teacher(student, rows, targets.teacher_probs), _kl_to_teacher(before, rows, targets.teacher_probs)
    assert after_kl < 0.5 * before_kl, (before_kl, after_kl)
    assert report["rationale_rows"] == 48 and report["steps"] == 60
    assert set(report["metrics"]) >= {"ndcg@10", "spearman", "macro_f1"}
    assert [m["epoch"] for m in report["epoch_metrics"]] == list(range(1, 11))  # dev metrics after every epoch
    assert [m["step"] for m in report["epoch_metrics"]] == list(range(6, 61, 6))
    assert report["metrics"] == {k: v for k, v in report["epoch_metrics"][-1].items() if k not in ("epoch", "step")}
    assert not (tmp_path / "out" / "checkpoint").exists()  # removed after a finished run
    assert load_student(tmp_path / "out").config == student.config


def read_labels_frame(pairs: pd.DataFrame, tmp_path: Path) -> pd.DataFrame:
    path = tmp_path / "labels.parquet"
    make_labels(pairs).to_parquet(path, index=False)
    return read_labels(path)


def load_student_fresh():
    from broadfast.model.student import build_student

    torch.manual_seed(0)
    return build_student(StudentConfig.tiny(dropout=0.0))


def test_resume_continues_exactly(pairs: pd.DataFrame, tmp_path: Path) -> None:
    targets = human_targets(pairs, "relevance")
    base = {"epochs": 2, "batch_size": 8, "progress": False, "checkpoint_every": 1}
    straight, _ = train_offline_frame(pairs, targets, TrainConfig(**base), StudentConfig.tiny(), tmp_path / "a")
    # interrupted after 5 of 12 steps, then resumed from the checkpoint
    train_offline_frame(pairs, targets, TrainConfig(**base, max_steps=5), StudentConfig.tiny(), tmp_path / "b", keep_checkpoint=True)
    assert (tmp_path / "b" / "checkpoint" / "trainer.json").exists()
    resumed, report = train_offline_frame(pairs, targets, TrainConfig(**base), StudentConfig.tiny(), tmp_path / "b")
    assert report["resumed_from_step"] == 5 and report["steps"] == 12
    a, b = straight.state_dict(), resumed.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_epoch_hook_runs_once_per_completed_epoch_across_a_resume(pairs: pd.DataFrame, tmp_path: Path) -> None:
    targets = human_targets(pairs, "relevance")
    base = {"epochs": 3, "batch_size": 16, "progress": False, "checkpoint_every": 1}  # 3 steps an epoch
    _, first = train_offline_frame(pairs, targets, TrainConfig(**base, max_steps=4), StudentConfig.tiny(), tmp_path / "r", keep_checkpoint=True, eval_df=pairs)
    assert [m["epoch"] for m in first["epoch_metrics"]] == [1.0]  # stopped inside epoch 2
    assert set(first["metrics"]) >= {"spearman"}  # evaluated at the stop even so
    _, second = train_offline_frame(pairs, targets, TrainConfig(**base), StudentConfig.tiny(), tmp_path / "r", eval_df=pairs)
    assert [(m["epoch"], m["step"]) for m in second["epoch_metrics"]] == [(2.0, 6.0), (3.0, 9.0)]


def test_resume_on_other_data_is_refused(pairs: pd.DataFrame, tmp_path: Path) -> None:
    targets = human_targets(pairs, "grade")
    cfg = TrainConfig(epochs=1, batch_size=8, progress=False, max_steps=2)
    train_offline_frame(pairs, targets, cfg, StudentConfig.tiny(), tmp_path / "o", keep_checkpoint=True)
    other = pairs.iloc[::-1].reset_index(drop=True)
    with pytest.raises(CheckpointError, match="other data"):
        train_offline_frame(other, human_targets(other, "grade"), cfg, StudentConfig.tiny(), tmp_path / "o")


def test_labels_without_embeddings_train_without_alignment(pairs: pd.DataFrame, tmp_path: Path) -> None:
    path = tmp_path / "labels.parquet"
    frame = make_labels(pairs, with_embeddings=False)
    frame["p_irrelevant"], frame["p_partial"], frame["p_exact"] = zip(*frame.pop("probs"))
    frame.iloc[:20].to_parquet(path, index=False)
    rows, targets = label_targets(pairs, read_labels(path), k=3, dim=384)
    assert len(rows) == 20 and targets.rationale is None and not targets.has_rationale.any()


def test_bad_labels_are_refused_clearly(pairs: pd.DataFrame, tmp_path: Path) -> None:
    frame = make_labels(pairs, with_embeddings=False)
    frame.loc[3, "probs"] = [0.5, 0.5, 0.5]
    frame.to_parquet(tmp_path / "bad.parquet", index=False)
    with pytest.raises(LabelsError, match="not a distribution"):
        read_labels(tmp_path / "bad.parquet")
    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "nokey.parquet")
    with pytest.raises(LabelsError, match="pair_id"):
        read_labels(tmp_path / "nokey.parquet")
    other = make_labels(pairs.assign(query="something else entirely"), with_embeddings=False)
    other.to_parquet(tmp_path / "other.parquet", index=False)
    with pytest.raises(LabelsError, match="no row of the data matches"):
        label_targets(pairs, read_labels(tmp_path / "other.parquet"), 3, 384)


def test_rationale_texts_are_embedded_when_embeddings_are_absent(pairs: pd.DataFrame, tmp_path: Path) -> None:
    from broadfast.model.embedder import shared_embedder

    frame = make_labels(pairs.iloc[:6], with_embeddings=False)
    frame["rationales"] = [[f"the query asks for {q}", "the brand matches", "the product type differs"] for q in pairs["query"].iloc[:6]]
    frame.loc[5, "rationales"] = None  # this label has no rationales at all
    frame.to_parquet(tmp_path / "labels.parquet", index=False)
    _, targets = label_targets(pairs, read_labels(tmp_path / "labels.parquet"), k=3, dim=384)
    assert targets.has_rationale.tolist() == [True] * 5 + [False]
    expected = shared_embedder().encode(list(frame.loc[0, "rationales"]))
    np.testing.assert_allclose(targets.rationale[0], expected, atol=1e-5)
