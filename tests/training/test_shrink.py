"""A smaller student shrunk from a trained one: layer copy, save/load, CLI arguments, learning, registry."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from broadfast.cli.training import train
from broadfast.model.student import pair_texts
from broadfast.training.distill import TrainConfig, train_offline_frame
from broadfast.training.losses import LossConfig
from broadfast.model.registry import sha256_file
from broadfast.training.shrink import keep_layers, shrink_student, student_targets
from broadfast.model.student import Student, StudentConfig, build_student, load_student, save_student
from broadfast.training.targets import human_targets


def four_layer_config(**overrides: object) -> StudentConfig:
    cfg = StudentConfig.tiny(**overrides)  # type: ignore[arg-type]
    return dataclasses.replace(cfg, encoder={**cfg.encoder, "num_hidden_layers": 4})


def four_layer_source(seed: int = 0) -> Student:
    torch.manual_seed(seed)
    return build_student(four_layer_config(dropout=0.0))


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    return float((p * (np.log(np.clip(p, 1e-8, None)) - np.log(np.clip(q, 1e-8, None)))).sum(1).mean())


def test_keep_layers_takes_the_bottom_ones_and_refuses_nonsense() -> None:
    assert keep_layers(6, 3) == [0, 1, 2] and keep_layers(6, 1) == [0] and keep_layers(4, 3) == [0, 1, 2]
    for bad in (0, -1, 6, 7):
        with pytest.raises(ValueError, match="between 1 and 5"):
            keep_layers(6, bad)


@pytest.mark.parametrize("keep", [None, [1, 3]])
def test_shrunk_student_starts_from_the_source_layers_and_round_trips(tmp_path: Path, keep: list[int] | None) -> None:
    source = four_layer_source()
    small, kept = shrink_student(source, 2, keep)
    assert kept == (keep or [0, 1])
    assert small.config.encoder["num_hidden_layers"] == 2 and small.config.init_from == "student"
    assert small.config.encoder | {"num_hidden_layers": 4} == source.config.encoder
    assert dataclasses.replace(small.config, encoder=source.config.encoder, init_from=source.config.init_from) == source.config
    src, got = source.state_dict(), small.state_dict()
    for key, value in got.items():
        if key.startswith("encoder.encoder.layer."):
            i, rest = key.removeprefix("encoder.encoder.layer.").split(".", 1)
            want = src[f"encoder.encoder.layer.{kept[int(i)]}.{rest}"]
        else:  # embeddings, extractor, head, alignment projection
            want = src[key]
        assert torch.equal(value, want), key
    with torch.no_grad():  # a copy, not a view: training the small one leaves the source alone
        small.encoder.encoder.layer[0].attention.self.query.weight.add_(1.0)
    assert torch.equal(source.state_dict()[f"encoder.encoder.layer.{kept[0]}.attention.self.query.weight"], src[f"encoder.encoder.layer.{kept[0]}.attention.self.query.weight"])

    save_student(small, tmp_path / "small")
    loaded = load_student(tmp_path / "small")
    assert loaded.config == small.config and len(loaded.encoder.encoder.layer) == 2
    q, t = pair_texts(pd.DataFrame({"query": ["cordless drill", "paint roller"], "title": ["18V drill kit", "9 in. roller cover"]}))
    probs = loaded.predict_proba(q, t)
    assert probs.shape == (2, 3) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, small.eval().predict_proba(q, t), atol=1e-6)
    assert build_student(small.config).config.init_from == "student"  # the architecture builds (random) from a saved config
    with pytest.raises(ValueError, match="between 1 and 3"):
        shrink_student(source, 4)
    with pytest.raises(ValueError, match="increasing layer indices"):
        shrink_student(source, 2, [3, 1])


def test_a_shrunk_student_learns_to_reproduce_its_source(pairs: pd.DataFrame, tmp_path: Path) -> None:
    # A source whose predictions depend on the pair: the 4-layer tiny student trained on the pairs' human grades.
    cfg = TrainConfig(epochs=8, batch_size=8, lr=3e-3, head_lr=3e-3, warmup=0.0, progress=False, checkpoint=False)
    source, _ = train_offline_frame(pairs, human_targets(pairs, "grade"), cfg, four_layer_config(dropout=0.0), tmp_path / "source", student=four_layer_source())
    targets = student_targets(source, pairs, progress=False)
    assert targets.source == "student" and np.array_equal(targets.grades, pairs["grade"].to_numpy())
    teacher = targets.teacher_probs
    assert np.ptp(teacher[:, 2]) > 0.2  # the source tells pairs apart: there is something to reproduce

    small, _ = shrink_student(source, 1)
    q, t = pair_texts(pairs)
    untrained = small.eval().predict_proba(q, t)
    distil = TrainConfig(epochs=8, batch_size=8, lr=3e-3, head_lr=3e-3, warmup=0.0, progress=False, checkpoint=False, loss=LossConfig(ce_weight=0.0, temperature=1.0))
    trained, report = train_offline_frame(pairs, targets, distil, small.config, tmp_path / "small", student=small)
    after, before = _kl(teacher, trained.predict_proba(q, t)), _kl(teacher, untrained)
    assert after < 0.5 * before, (before, after)
    assert report["targets"] == "student" and report["student"]["encoder"]["num_hidden_layers"] == 1


def _source_folder(tmp_path: Path) -> Path:
    return save_student(four_layer_source(), tmp_path / "source")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layers", "2"], "--layers needs --from-student"),
        (["--from-student", "{src}"], "--from-student needs --layers"),
        (["--from-student", "{src}", "--layers", "0"], "0 is not in the range x>=1"),
        (["--from-student", "{src}", "--layers", "4"], "4 is not fewer than the source student's 4 encoder layers"),
        (["--from-student", "{src}", "--layers", "9"], "9 is not fewer than the source student's 4 encoder layers"),
        (["--from-student", "{src}", "--layers", "2", "--labels", "l.parquet"], "cannot be combined with --labels"),
        (["--from-student", "{src}", "--layers", "2", "--extractor", "none", "--max-length", "32"], "drop --extractor, --max-length"),
        (["--from-student", "{tmp}", "--layers", "2"], "is not a student model folder"),
    ],
)
def test_shrink_arguments_are_refused_with_a_usage_error(tmp_path: Path, args: list[str], message: str) -> None:
    src = _source_folder(tmp_path)
    argv = ["offline", "--data", str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "out")] + [a.format(src=src, tmp=tmp_path) for a in args]
    result = CliRunner().invoke(train, argv)
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "out").exists()


def test_train_offline_from_student_writes_a_smaller_student_with_its_lineage(pairs: pd.DataFrame, tmp_path: Path) -> None:
    src = _source_folder(tmp_path)
    data = tmp_path / "pairs.parquet"
    pairs.to_parquet(data, index=False)
    out = tmp_path / "small"
    argv = ["offline", "--data", str(data), "--out", str(out), "--from-student", str(src), "--layers", "2", "--limit", "40",
            "--epochs", "1", "--batch-size", "16", "--eval", str(data)]  # fmt: skip
    result = CliRunner().invoke(train, argv)
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((out / "training.json").read_text())
    assert report["steps"] == 3 and report["targets"] == "student" and report["trained_on"]["rows"] == 40
    assert report["trained_on"]["from_student"] == {"folder": str(src.resolve()), "sha256": sha256_file(src / "model.safetensors"), "source_layers": 4, "kept_layers": [0, 1]}
    assert report["student"]["encoder"]["num_hidden_layers"] == 2 and report["student"]["init_from"] == "student"
    assert report["student"]["max_length"] == 64 and set(report["metrics"]) >= {"spearman", "ndcg@10"}
    small = load_student(out)
    assert len(small.encoder.encoder.layer) == 2
    assert small.predict_proba(["drill"], ["cordless drill"]).shape == (1, 3)


@pytest.mark.integration
def test_the_registry_takes_a_shrunk_student_like_any_other(bus_settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from broadfast.model.registry import Registry

    source = four_layer_source()
    small, kept = shrink_student(source, 2)
    folder = save_student(small, tmp_path / "small")
    (folder / "training.json").write_text(json.dumps({"metrics": {"spearman": 0.4}, "trained_on": {"from_student": {"kept_layers": kept}}}))
    reg = Registry(bus_settings.model_copy(update={"registry_root": tmp_path / "registry"}))
    manifest = reg.publish(folder)
    assert manifest.student["layers"] == 2 and manifest.student["init_from"] == "student"
    assert manifest.trained_on == {"from_student": {"kept_layers": [0, 1]}}
    loaded, shown = reg.load()
    assert shown.version == manifest.version and len(loaded.encoder.encoder.layer) == 2
    np.testing.assert_array_equal(loaded.predict_proba(["drill"], ["cordless drill"]), load_student(folder).predict_proba(["drill"], ["cordless drill"]))
