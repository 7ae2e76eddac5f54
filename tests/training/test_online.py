"""Online distillation: replay buffer, held-out slice, rounds, gate, publish, commit, restart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from broadfast.settings import Settings
from streams import events as ev
from streams.bus import EventBus
from tests.conftest import read_topic
from training import online
from training.online import LabelRow, ReplayBuffer, is_held_out, run_online, validation_slice


def row(i: int) -> LabelRow:
    return LabelRow(pair_id=f"p{i}", query=f"q{i}", text="t", probs=[0.2, 0.3, 0.5], rationale=None, partition=0, offset=i)


def test_reservoir_keeps_a_bounded_uniform_sample() -> None:
    buf = ReplayBuffer(capacity=50, seed=1)
    for i in range(1000):
        buf.add(row(i))
        if i % 10 == 9:
            buf.retire_fresh()
    assert len(buf.reservoir) == 50 and buf.seen == 1000 and not buf.fresh
    offsets = np.array([r.offset for r in buf.reservoir])
    assert offsets.mean() == pytest.approx(500, abs=120)  # uniform over the stream, not the latest


def test_batches_mix_fresh_and_replayed_labels() -> None:
    buf = ReplayBuffer(capacity=100, seed=0)
    for i in range(40):
        buf.add(row(i))
    buf.retire_fresh()
    for i in range(40, 60):
        buf.add(row(i))
    batch = buf.batch(16, replay_fraction=0.5)
    fresh = sum(r.offset >= 40 for r in batch)
    assert len(batch) == 16 and fresh == 8
    assert len(buf.batch(16, replay_fraction=0.0)) == 16


def test_buffer_round_trips_through_a_frame() -> None:
    buf = ReplayBuffer(capacity=10)
    buf.add(LabelRow("p", "q", "t", [0.1, 0.2, 0.7], [[0.5] * 4] * 3, 1, 7, 12.5))
    buf.retire_fresh()
    buf.add(row(3))
    other = ReplayBuffer(capacity=10)
    other.load_frame(buf.to_frame())
    assert other.reservoir == buf.reservoir and other.fresh == buf.fresh


def test_held_out_queries_are_stable_and_about_the_share() -> None:
    queries = [f"query number {i}" for i in range(4000)]
    share = np.mean([is_held_out(q, 0.2) for q in queries])
    assert share == pytest.approx(0.2, abs=0.03)
    assert is_held_out("Cordless  Drill", 0.5) == is_held_out("cordless drill", 0.5)


def tiny_data(tmp_path: Path, n_queries: int = 40) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for q in range(n_queries):
        for a in range(5):
            grade = int(rng.integers(0, 3))
            rows.append({"query": f"query {q}", "product_id": f"{q}-{a}", "title": f"product {a} {'match' if grade == 2 else 'other'}", "description": "", "relevance": 1.0 + grade, "grade": grade})
    path = tmp_path / "pairs.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


def test_validation_slice_is_whole_held_out_queries(tmp_path: Path) -> None:
    df = pd.read_parquet(tiny_data(tmp_path)).assign(description="")
    val = validation_slice(df, 0.5, max_pairs=40)
    assert 0 < len(val) <= 40 and len(val) % 5 == 0
    assert all(is_held_out(q, 0.5) for q in val["query"])


def labels_for(data: Path, start: int, n: int) -> list[ev.TeacherLabel]:
    df = pd.read_parquet(data)
    out = []
    for _, r in df.iloc[start : start + n].iterrows():
        probs = [0.05, 0.05, 0.05]
        probs[int(r["grade"])] = 0.9
        out.append(ev.TeacherLabel(
            pair_id=ev.pair_id(r["query"], r["product_id"]), query=r["query"], ad_id=r["product_id"], ad_title=r["title"],
            perspectives=[ev.Perspective(name="oracle", rationale="human grade", probs=tuple(probs))], probs=tuple(probs),
            rationale_embeddings=None, teacher_id="oracle@test", ts=1.0, first_scored_ts=0.5,
        ))  # fmt: skip
    return out


@pytest.mark.integration
def test_online_rounds_publish_commit_and_resume(bus_settings: Settings, tmp_path: Path) -> None:
    from training.registry import Registry
    from training.student import StudentConfig, build_student, save_student

    data = tiny_data(tmp_path)
    settings = bus_settings.model_copy(update={
        "home": tmp_path / "home", "online_round_labels": 20, "online_steps_per_round": 2, "online_batch_size": 8,
        "online_publish_every_s": 0.0, "online_gate_tolerance": 1.0, "online_val_share": 0.3, "online_val_pairs": 30,
        "train_device": "cpu",
    })  # fmt: skip
    registry = Registry(settings)
    first = registry.publish(save_student(build_student(StudentConfig.tiny()), tmp_path / "v0"), announce=False)
    labels = labels_for(data, 0, 120)
    with EventBus(settings) as bus:
        for label in labels:
            bus.publish(label)
    trainer = run_online(settings, max_rounds=2, val_data=data)
    assert trainer.rounds == 2 and trainer.steps == 4
    trained = trainer.labels_trained
    assert trained >= 40 and trainer.held_out > 0
    published = [ev.decode("models", r.value) for r in read_topic(settings, "models", expect=2)]
    assert [m.parent_version for m in published] == [first.version, published[0].version]
    assert published[-1].trained_on["labels"] == trained
    assert registry.champion() == published[-1].version
    assert (settings.home / "trainer" / "checkpoint" / "online.json").exists()

    # restart: picks up the checkpoint and the committed offsets, trains only what is new
    again = run_online(settings, max_rounds=1, val_data=data)
    assert again.rounds == 3 and again.steps == 6
    third = [ev.decode("models", r.value) for r in read_topic(settings, "models", expect=3)][-1]
    assert third.parent_version == published[-1].version and again.live_version == third.version
    seen = sum(again.offsets.values())
    assert again.labels_trained + again.held_out <= seen <= len(labels)
    assert again.labels_trained > trained


def test_the_gate_refuses_a_worse_candidate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from training.student import StudentConfig, build_student

    published = []

    class Registry:
        def publish(self, *a, **k):
            published.append(k)
            raise AssertionError("must not publish")

    settings = Settings(home=tmp_path, online_publish_every_s=0.0, online_gate_tolerance=0.01, train_device="cpu")
    trainer = online.OnlineTrainer(settings, Registry(), pd.DataFrame())
    trainer.student = build_student(StudentConfig.tiny())
    trainer._make_optimizer()
    trainer.live_version, trainer.live_metrics = "v0001", {"spearman": 0.50}
    monkeypatch.setattr(online, "validate", lambda student, val: {"spearman": 0.40})
    for i in range(5):
        trainer.add(row(i))
    result = trainer.train_round()
    assert result.published is None and "0.4000 < live 0.5000" in (result.refused or "")
    assert not published and trainer.live_version == "v0001"
    assert (tmp_path / "trainer" / "checkpoint" / "online.json").exists()  # labels kept in a checkpoint
