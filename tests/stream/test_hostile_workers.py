"""Hostile events through the REAL workers' own consuming code, not the generic ``consume()``.

The corpus (``tests/hostile/events.jsonl``, loaded by ``load_corpus`` of test_hostile_events.py)
is fed to each worker beside valid events of its topic. For each worker: every hostile record is
dead-lettered exactly once, under the worker's consumer name, with the case's reason, its source
topic/partition/offset and its payload kept; the worker stays alive and handles the valid events.

* stream worker (``broadfast.stream.app.StreamProcessor``, in-process, no faust loop): ``scored``, ``clicks``;
* labeler (``broadfast.teacher.worker.Labeler`` with the oracle teacher): ``hardcases``;
* online trainer (``broadfast.training.online.run_online``, tiny student, in a thread): ``labels``.

Not covered here: ``requests`` (read by the serving path, not a worker run in-process here),
``models`` (the model watcher of the server), ``alerts`` and ``deadletter`` (no worker consumes
them); their cases go through the generic consumer in test_hostile_events.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from broadfast.core.settings import Settings
from broadfast.core import events as ev
from broadfast.core.bus import EventBus
from broadfast.core.deadletter import truncate_payload
from tests.conftest import read_topic
from tests.core.test_events import sample_events
from tests.core.test_hostile_events import load_corpus
from tests.stream.test_app_sampler import SURE_NO, scored
from tests.teacher.test_worker import hard_case
from tests.training.test_online import labels_for, tiny_data

pytestmark = pytest.mark.integration

Key = tuple[str, int, int]  # (full topic, partition, offset)
VALID_EVERY = 4  # a valid event after every four hostile ones


def cases_of(settings: Settings, *topics: str) -> list[dict]:
    return [c for c in load_corpus(settings.kafka.max_event_bytes) if c["topic"] in topics]


def check_letters(settings: Settings, bad: dict[Key, dict], consumer: str, *, timeout_s: float = 30.0) -> None:
    """Exactly one dead letter per hostile record, from ``consumer``, with its reason; no others."""
    records = read_topic(settings, "deadletter", expect=len(bad), timeout_s=timeout_s)
    again = read_topic(settings, "deadletter", expect=len(bad) + 1, timeout_s=3.0)  # a few seconds more: a second letter?
    records = max(records, again, key=len)
    found: dict[Key, list[ev.DeadLetter]] = {}
    for record in records:
        letter = ev.decode("deadletter", record.value)
        found.setdefault((letter.source_topic, letter.partition, letter.offset), []).append(letter)
    problems = []
    for key, case in bad.items():
        got = found.get(key, [])
        if len(got) != 1:
            problems.append(f"case {case['name']} at {key}: {len(got)} dead letters {[g.error for g in got]}, expected exactly one")
            continue
        letter = got[0]
        if letter.consumer != consumer:
            problems.append(f"case {case['name']}: dead-lettered by {letter.consumer!r}, expected {consumer!r}")
        if case["reason"] not in letter.error:
            problems.append(f"case {case['name']}: error {letter.error!r} lacks {case['reason']!r}")
        if (letter.payload, letter.payload_bytes) != truncate_payload(case["raw"], settings.kafka.deadletter_payload_bytes):
            problems.append(f"case {case['name']}: payload not kept")
    strays = [(k, [x.error for x in v]) for k, v in found.items() if k not in bad]
    assert not problems and not strays, "\n".join(problems + [f"dead letters for records that were not hostile: {strays}"] * bool(strays))


def test_stream_worker_dead_letters_each_hostile_scored_and_click_once(bus_settings: Settings) -> None:
    from broadfast.stream.app import CONSUMER_NAME, StreamProcessor

    # the sampler's budget as in test_stream_app_sampler.py: a bucket that never refills, no Feast push
    settings = bus_settings.model_copy(update={
        "stream_push_features": False, "stream_budget_per_s": 1e-6, "stream_budget_min_per_s": 1e-6, "stream_budget_burst": 100.0,
        "stream_max_queue_s": 1e9, "stream_explore_share": 0.0,
    })  # fmt: skip
    click = next(e for e in sample_events() if isinstance(e, ev.Click))
    bad: dict[Key, dict] = {}
    valid = {"scored": 0, "clicks": 0}
    processor = StreamProcessor(settings)
    try:
        for short in ("scored", "clicks"):
            topic, offset, batch = settings.topic(short), 0, []
            mine = cases_of(settings, short)
            for i, case in enumerate(mine, 1):
                batch.append((topic, 0, offset, case["raw"]))
                bad[(topic, 0, offset)] = case
                offset += 1
                if i % VALID_EVERY == 0 or i == len(mine):
                    good = scored(i, "drill", f"a{i}", SURE_NO) if short == "scored" else click.model_copy(update={"ad_id": f"a{i}"})
                    batch.append((topic, 0, offset, ev.encode(good)))
                    offset, valid[short] = offset + 1, valid[short] + 1
                    processor.process(short, batch)  # a worker that died here would raise
                    batch = []
        stats = processor.stats
    finally:
        processor.close()
    assert (stats.scored, stats.clicks) == (valid["scored"], valid["clicks"]), f"valid events not processed: {stats}"
    assert stats.counted == sum(valid.values()), f"valid events not counted: {stats.counted} of {sum(valid.values())}"
    assert stats.deadletters == len(bad), f"{stats.deadletters} dead letters for {len(bad)} hostile records"
    check_letters(settings, bad, CONSUMER_NAME)


def test_labeler_dead_letters_each_hostile_hard_case_once_and_labels_the_valid_ones(bus_settings: Settings) -> None:
    from broadfast.teacher.worker import CONSUMER_NAME, Labeler
    from broadfast.simulation.oracle import OracleTeacher

    mine = cases_of(bus_settings, "hardcases")
    good = [hard_case(f"query {i}", f"ad{i}", f"title {i}") for i in range((len(mine) + VALID_EVERY - 1) // VALID_EVERY)]
    oracle = OracleTeacher.from_frame(pd.DataFrame({"query": [c.query for c in good], "ad_id": [c.ad_id for c in good], "grade": [2] * len(good)}), source="toy.parquet")
    bad: dict[Key, dict] = {}
    with EventBus(bus_settings) as bus:
        for i, case in enumerate(mine, 1):
            meta = bus.publish_raw("hardcases", case["raw"], key=case["name"].encode()).get(timeout=10)
            bad[(meta.topic, meta.partition, meta.offset)] = case
            if i % VALID_EVERY == 0 or i == len(mine):
                bus.publish(good[(i - 1) // VALID_EVERY]).get(timeout=10)
        bus.flush()
    worker = Labeler(bus_settings, oracle)
    try:
        stats = worker.run(idle_polls=10)  # until idle: returns normally, does not raise
    finally:
        worker.close()
    assert (stats.consumed, stats.labelled, stats.failed) == (len(good), len(good), 0), f"valid hard cases not all labelled: {stats}"
    labels = [ev.decode("labels", r.value) for r in read_topic(bus_settings, "labels", expect=len(good), timeout_s=15)]
    assert sorted(x.pair_id for x in labels) == sorted(c.pair_id for c in good), "one label per valid hard case"
    check_letters(bus_settings, bad, CONSUMER_NAME)


def test_online_trainer_dead_letters_each_hostile_label_once_and_publishes(bus_settings: Settings, tmp_path: Path) -> None:
    from broadfast.training.online import run_online
    from broadfast.model.registry import Registry
    from broadfast.model.student import StudentConfig, build_student, save_student

    data = tiny_data(tmp_path)
    settings = bus_settings.model_copy(update={
        "home": tmp_path / "home", "online_round_labels": 20, "online_round_wait_s": 1.0, "online_passes": 1, "online_batch_size": 10, "online_replay_fraction": 0.0,
        "online_publish_every_s": 0.0, "online_gate_tolerance": 1.0, "online_val_share": 0.3, "online_val_pairs": 30, "train_device": "cpu",
    })  # fmt: skip  (as in test_online.py's poison test: the gate wide open, this is about poison)
    Registry(settings).publish(save_student(build_student(StudentConfig.tiny()), tmp_path / "v0"), announce=False)
    mine, good = cases_of(settings, "labels"), iter(labels_for(data, 0, 60))
    bad: dict[Key, dict] = {}
    with EventBus(settings) as bus:
        for i, case in enumerate(mine, 1):
            meta = bus.publish_raw("labels", case["raw"], key=case["name"].encode()).get(timeout=10)
            bad[(meta.topic, meta.partition, meta.offset)] = case
            if i % VALID_EVERY == 0:
                for _ in range(VALID_EVERY):
                    bus.publish(next(good))
        for label in good:  # the rest of the valid labels last
            bus.publish(label)
        bus.flush()

    stop, out = threading.Event(), {}

    def target() -> None:
        try:
            out["trainer"] = run_online(settings, stop=stop, val_data=data)
        except BaseException as exc:  # noqa: BLE001 - reported below
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        models = read_topic(settings, "models", expect=1, timeout_s=90)
        read_topic(settings, "deadletter", expect=len(bad), timeout_s=30)
        time.sleep(3.0)  # a few polls more: a hostile label read twice would be dead-lettered twice
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive(), "the trainer did not stop"
    assert "error" not in out, f"the trainer died: {out.get('error')!r}"
    trainer = out["trainer"]
    assert models and trainer.rounds >= 1 and trainer.live_version is not None, "the trainer published no version beside the hostile labels"
    assert trainer.labels_trained > 0
    check_letters(settings, bad, "trainer")
