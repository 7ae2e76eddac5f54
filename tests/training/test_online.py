"""Online distillation: replay buffer, held-out slice, rounds, gate, publish, commit, restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from broadfast.core.settings import Settings
from broadfast.core import events as ev
from broadfast.core.bus import EventBus
from broadfast.core.datasets import load_pairs
from tests.conftest import read_topic
from broadfast.training.learner import LabelRow, ReplayBuffer
from broadfast.training.online import is_held_out, run_online, validation_frame, validation_slice


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


def test_schedule_repeats_every_fresh_label_once_per_pass_and_replay_draws_old_ones() -> None:
    buf = ReplayBuffer(capacity=100, seed=0)
    old = [row(i) for i in range(40)]
    buf.retire(old)
    fresh = [row(i) for i in range(40, 60)]
    order = buf.schedule(fresh, passes=3)
    assert sorted(r.offset for r in order) == sorted([r.offset for r in fresh] * 3)
    assert sorted(r.offset for r in order[:20]) == [r.offset for r in fresh]  # each pass covers every fresh label
    replayed = buf.replay(8)
    assert len(replayed) == 8 and all(r.offset < 40 for r in replayed) and len({r.offset for r in replayed}) == 8


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
            rows.append({"query": f"query {q}", "ad_id": f"{q}-{a}", "title": f"product {a} {'match' if grade == 2 else 'other'}", "text": "", "relevance": 1.0 + grade, "grade": grade})
    path = tmp_path / "pairs.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


def test_validation_slice_is_whole_held_out_queries(tmp_path: Path) -> None:
    df = pd.read_parquet(tiny_data(tmp_path)).assign(text="")
    val = validation_slice(df, 0.5, max_pairs=40)
    assert 0 < len(val) <= 40 and len(val) % 5 == 0
    assert all(is_held_out(q, 0.5) for q in val["query"])


def test_a_validation_slice_over_two_data_sets_pools_their_held_out_queries_on_one_scale(shared_data: Path) -> None:
    hd, cf = shared_data / "homedepot" / "dev.parquet", shared_data / "crowdflower" / "dev.parquet"
    val = validation_frame([hd, cf], 0.2, 400)
    hd_q, cf_q = set(pd.read_parquet(hd)["query"]), set(pd.read_parquet(cf)["query"])
    assert val["query"].isin(hd_q).any() and val["query"].isin(cf_q).any() and len(val) <= 400 + 200  # whole queries: may pass each half a little
    assert all(is_held_out(q, 0.2) for q in val["query"])
    for path, queries in ((hd, hd_q), (cf, cf_q)):  # each file's relevance rescaled from the file's own scale onto 1-3
        df = load_pairs(path, require_grade=True)
        low, high = df["relevance"].min(), df["relevance"].max()
        part = val[val["query"].isin(queries)].merge(df[["query", "ad_id", "relevance"]].drop_duplicates(["query", "ad_id"]), on=["query", "ad_id"], suffixes=("", "_file"))
        assert len(part) and np.allclose(part["relevance"], 1.0 + 2.0 * (part["relevance_file"] - low) / (high - low))
        assert part["relevance"].between(1.0, 3.0).all()
    alone = validation_frame([hd], 0.2, 400)
    pd.testing.assert_frame_equal(alone, validation_slice(load_pairs(hd, require_grade=True), 0.2, 400))


def labels_for(data: Path, start: int, n: int) -> list[ev.TeacherLabel]:
    df = load_pairs(data)
    out = []
    for _, r in df.iloc[start : start + n].iterrows():
        probs = [0.05, 0.05, 0.05]
        probs[int(r["grade"])] = 0.9
        out.append(ev.TeacherLabel(
            pair_id=ev.pair_id(r["query"], r["ad_id"]), query=r["query"], ad_id=r["ad_id"], title=r["title"],
            perspectives=[ev.Perspective(name="oracle", rationale="human grade", probs=tuple(probs))], probs=tuple(probs),
            rationale_embeddings=None, teacher_id="oracle@test", ts=1.0, first_scored_ts=0.5,
        ))  # fmt: skip
    return out


@pytest.mark.integration
def test_online_rounds_publish_commit_and_resume(bus_settings: Settings, tmp_path: Path) -> None:
    from broadfast.model.registry import Registry
    from broadfast.model.student import StudentConfig, build_student, save_student

    data = tiny_data(tmp_path)
    settings = bus_settings.model_copy(update={
        "home": tmp_path / "home", "online_round_labels": 20, "online_passes": 1, "online_batch_size": 10, "online_replay_fraction": 0.0,
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
    assert trainer.rounds == 2 and trainer.steps == 4  # 20 labels a round, one pass, 10 a step: steps follow labels
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
    assert third.trained_on["teachers"] == {"oracle@test": again.labels_trained}
    assert third.parent_version == published[-1].version and again.live_version == third.version
    seen = sum(again.offsets.values())
    assert again.labels_trained + again.held_out <= seen <= len(labels)
    assert again.labels_trained > trained


@pytest.mark.integration
@pytest.mark.parametrize("revert_after", [1, 2])
def test_the_gate_on_refuses_worse_candidates_computed_for_real_and_never_slides(bus_settings: Settings, tmp_path: Path, revert_after: int) -> None:
    """Twelve real rounds, gate on (tolerance 0.02, every round judged): good rounds and rounds of flipped labels.

    Flipped labels make real, worse candidates; the gate must refuse them, say why, revert to the
    champion, and no published version may fall below the first champion's score minus the tolerance.
    """
    import torch

    from tests.training.test_learner import learnable_pairs, rows_of
    from broadfast.training.learner import LearnerConfig, OnlineLearner
    from broadfast.training.online import OnlineTrainer
    from broadfast.model.registry import Registry
    from broadfast.model.student import StudentConfig, build_student, save_student

    torch.manual_seed(0)
    settings = bus_settings.model_copy(update={
        "home": tmp_path / "home", "online_publish_every_s": 0.0, "online_gate_tolerance": 0.02, "online_gate_resamples": 100,
        "online_revert_after_refusals": revert_after, "train_device": "cpu",
    })  # fmt: skip
    cfg = LearnerConfig(passes=2, batch_size=16, lr=3e-3, head_lr=3e-3, warmup_steps=5, seed=0)
    warm = OnlineLearner(build_student(StudentConfig.tiny(extractor="none")), cfg)
    warm.learn_many(rows_of(learnable_pairs(24, seed=2)))  # a first champion that already knows something
    registry = Registry(settings)
    registry.publish(save_student(warm.student, tmp_path / "v0"), champion=True, announce=False)

    val = learnable_pairs(12, seed=1)
    trainer = OnlineTrainer(settings, registry, val, learner_config=cfg)
    trainer.start()
    first = trainer.champion.value
    stream = rows_of(learnable_pairs(120, seed=3))
    results = []
    for r in range(12):
        rows = stream[r * 40 : (r + 1) * 40]
        if r % 4 in (2, 3):  # poisoned rounds: every label says the opposite
            rows = [LabelRow(x.pair_id, x.query, x.text, x.probs[::-1], grade=2 - x.grade, teacher_id="flipped") for x in rows]
        for x in rows:
            trainer.buffer.add(x)
        results.append(trainer.train_round())
        assert trainer.champion.value >= first - 0.02 - 1e-9
    refused = [x for x in results if x.refused]
    published = [x for x in results if x.published]
    assert refused and published, [(x.round, x.verdict) for x in results]
    in_a_row = 0
    for x in results:
        in_a_row = in_a_row + 1 if x.refused else 0
        if x.refused:
            assert "< floor" in x.refused and "interval" in x.refused
        assert (x.reverted_to is not None) == (in_a_row == revert_after), (x.round, in_a_row, x.reverted_to)
        if x.reverted_to is not None:
            in_a_row = 0
    assert any(x.reverted_to for x in results)
    for x in published:
        assert x.candidate["spearman"] >= first - 0.02 - 1e-9
    versions = [m.version for m in registry.manifests()]
    assert len(versions) == 1 + len(published)
    last = registry.show(registry.champion())
    assert last.metrics["val_spearman"] >= first - 0.02 - 1e-9
    assert "flipped" not in last.trained_on["teachers"] or any(x.published and x.teachers.get("flipped") for x in results)


@pytest.mark.integration
def test_poisoned_labels_are_dead_lettered_and_a_broken_checkpoint_falls_back_with_an_alert(bus_settings: Settings, tmp_path: Path) -> None:
    """Labels whose rationale embeddings are finite in float64 but not float32 (1e39) once made every
    later loss NaN and the NaN weights were checkpointed. Now they are refused at the contract and
    dead-lettered once, the trainer publishes on; and a checkpoint that cannot be loaded is skipped
    with an alert — the trainer starts from the champion instead of not starting at all.
    (The gate is wide open here — tolerance 1 — because this test is about poison and restarts;
    the gate's own refusals are tested above with the gate on.)"""
    import json
    import time

    from broadfast.model.registry import Registry
    from broadfast.model.student import StudentConfig, build_student, save_student

    data = tiny_data(tmp_path)
    settings = bus_settings.model_copy(update={
        "home": tmp_path / "home", "online_round_labels": 20, "online_round_wait_s": 1.0, "online_passes": 1, "online_batch_size": 10, "online_replay_fraction": 0.0,
        "online_publish_every_s": 0.0, "online_gate_tolerance": 1.0, "online_val_share": 0.3, "online_val_pairs": 30, "train_device": "cpu",
    })  # fmt: skip
    registry = Registry(settings)
    registry.publish(save_student(build_student(StudentConfig.tiny()), tmp_path / "v0"), announce=False)
    import threading

    def run_until(expect_letters: int, expect_models: int) -> object:
        stop, out = threading.Event(), {}
        thread = threading.Thread(target=lambda: out.setdefault("trainer", run_online(settings, stop=stop, val_data=data)), daemon=True)
        thread.start()
        try:
            read_topic(settings, "deadletter", expect=expect_letters, timeout_s=60)
            read_topic(settings, "models", expect=expect_models, timeout_s=60)
            time.sleep(4.0)  # the last short round (after 1 s) and a few idle polls: the trainer commits what it read
        finally:
            stop.set()
            thread.join(timeout=60)
        return out["trainer"]

    good = labels_for(data, 0, 80)
    with EventBus(settings) as bus:
        for label in good[:40]:
            bus.publish(label)
        for label in good[40:]:  # the poison comes last: no later label's commit covers it
            payload = json.loads(ev.encode(label))
            payload["rationale_embeddings"] = [[1e39, 0.0, 0.0, 0.0]]  # one per perspective
            bus.publish_raw("labels", json.dumps(payload).encode(), key=label.pair_id.encode())
    trainer = run_until(40, 1)
    assert trainer.rounds >= 1 and trainer.live_version is not None
    assert registry.show(trainer.live_version).trained_on["labels"] == trainer.labels_trained > 0
    champion = trainer.live_version

    ckpt = settings.home / "trainer" / "checkpoint"
    (ckpt / "model.safetensors").write_bytes(b"torn by a crash")
    with EventBus(settings) as bus:
        for label in labels_for(data, 80, 60):
            bus.publish(label)
    published = len(registry.manifests()) - 1
    again = run_until(40, published + 1)
    assert again.problems and "cannot be resumed" in again.problems[0]
    assert again.rounds >= 1 and again.live_version != champion  # started from the champion, published again
    alerts = [ev.decode("alerts", r.value) for r in read_topic(settings, "alerts", expect=1)]
    assert [a.kind for a in alerts] == ["trainer_checkpoint_refused"] and alerts[0].details["started_from"] == champion
    letters = [ev.decode("deadletter", r.value) for r in read_topic(settings, "deadletter", expect=40, timeout_s=5)]
    assert all(d.consumer == "trainer" and "rationale_embeddings" in d.error for d in letters)
    assert len(letters) == 40 == len({(d.partition, d.offset) for d in letters})  # each poisoned label dead-lettered once, across the restart


@pytest.mark.integration
def test_published_versions_record_their_quality_on_the_newest_held_out_traffic_labels(bus_settings: Settings, tmp_path: Path) -> None:
    """Validation that follows the traffic: held-out labels fill a rolling slice; a published version
    records its figures on it, and a restart keeps the slice."""
    from broadfast.training.online import OnlineTrainer, row_of
    from broadfast.model.registry import Registry
    from broadfast.training.stream_slice import MIN_LABELS
    from broadfast.model.student import StudentConfig, build_student, save_student

    data = tiny_data(tmp_path, n_queries=120)
    settings = bus_settings.model_copy(update={
        "home": tmp_path / "home", "online_passes": 1, "online_batch_size": 10, "online_replay_fraction": 0.0, "online_publish_every_s": 0.0,
        "online_gate_tolerance": 1.0, "online_val_share": 0.5, "online_val_pairs": 30, "online_stream_val_labels": 150, "train_device": "cpu",
    })  # fmt: skip
    registry = Registry(settings)
    registry.publish(save_student(build_student(StudentConfig.tiny()), tmp_path / "v0"), announce=False)
    df = load_pairs(data)
    trainer = OnlineTrainer(settings, registry, validation_slice(df.assign(text=""), 0.5, 30))
    trainer.start()
    labels = labels_for(data, 0, len(df))
    held = [lab for lab in labels if is_held_out(lab.query, 0.5)]
    assert len(held) > 150 >= MIN_LABELS
    for offset, label in enumerate(labels[:40]):
        trainer.add(row_of(label, 0, offset))
    early = trainer.train_round()  # too few held-out labels yet: nothing claimed about the traffic
    manifests = {m.version: m for m in registry.manifests()}
    assert early.published and early.stream == {} and "stream_spearman" not in manifests[early.published].metrics
    for offset, label in enumerate(labels[40:], start=40):
        trainer.add(row_of(label, 0, offset))
    assert len(trainer.stream_val) == 150 and trainer.stream_val.seen == len(held)  # the newest 150 held-out labels
    assert {r.query for r in trainer.stream_val.rows} <= {lab.query for lab in held[-150:]}
    result = trainer.train_round()
    manifest = {m.version: m for m in registry.manifests()}[result.published]
    assert result.stream["stream_labels"] == 150 and np.isfinite(result.stream["stream_spearman"])
    assert manifest.metrics["stream_spearman"] == pytest.approx(result.stream["stream_spearman"]) and "val_spearman" in manifest.metrics

    again = OnlineTrainer(settings, registry, trainer.gate.val)
    again.start()  # from the checkpoint: the slice survives a restart
    assert [r.pair_id for r in again.stream_val.rows] == [r.pair_id for r in trainer.stream_val.rows]


@pytest.mark.integration
def test_the_gate_can_also_judge_on_the_newest_held_out_traffic_labels(bus_settings: Settings, tmp_path: Path) -> None:
    """online_gate_slice=fixed+stream: a candidate that holds the fixed slice's floor is still refused when it
    is worse than the champion on the newest held-out traffic labels, both measured there for real."""
    from broadfast.training.online import OnlineTrainer, RoundResult, row_of
    from broadfast.model.registry import Registry
    from broadfast.model.student import StudentConfig, build_student, save_student

    data = tiny_data(tmp_path, n_queries=120)
    settings = bus_settings.model_copy(update={
        "home": tmp_path / "home", "online_passes": 3, "online_batch_size": 10, "online_replay_fraction": 0.0, "online_publish_every_s": 1e10,
        "online_gate_tolerance": 0.05, "online_gate_slice": "fixed+stream", "online_val_share": 0.5, "online_val_pairs": 30,
        "online_stream_val_labels": 200, "train_device": "cpu",
    })  # fmt: skip
    registry = Registry(settings)
    registry.publish(save_student(build_student(StudentConfig.tiny()), tmp_path / "v0"), announce=False)
    df = load_pairs(data)

    def trained(flip: bool) -> tuple[OnlineTrainer, Any]:
        trainer = OnlineTrainer(settings.model_copy(update={"home": tmp_path / f"home-{flip}"}), registry, validation_slice(df.assign(text=""), 0.5, 30))
        trainer.start()
        for offset, label in enumerate(labels_for(data, 0, len(df))):
            if flip and not is_held_out(label.query, 0.5):  # trained on the opposite of the truth; held-out labels stay true
                label = label.model_copy(update={"probs": tuple(reversed(label.probs)), "perspectives": label.perspectives})
            trainer.add(row_of(label, 0, offset))
        for _ in range(4):
            trainer.train_round()
        assert trainer.stream_val.ready and trainer.champion is not None
        fixed = trainer.gate.judge(trainer.champion, trainer.champion, trainer.best)  # a verdict that holds the fixed slice's floor
        assert fixed.publish
        result = RoundResult(round=trainer.rounds, labels=0, steps=0, loss={})
        verdict = trainer._judge_on_traffic(fixed, result)
        assert np.isfinite(result.stream["stream_spearman"])  # the candidate's figure on the traffic, kept for its manifest
        return trainer, verdict

    worse, verdict = trained(flip=True)
    assert not verdict.publish and "held-out traffic labels" in verdict.reason and "below it by more than the tolerance" in verdict.reason
    better, verdict = trained(flip=False)
    assert verdict.publish and "held-out traffic labels" in verdict.reason
