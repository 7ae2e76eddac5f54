"""The labeling worker against the real broker and Redis (fixtures), with real teachers:
the transformers backend with a tiny from-scratch model, and the oracle."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pandas as pd
import pytest
import redis

from broadfast.core.datasets import load_pairs
from broadfast.core.settings import Settings
from broadfast.core.bus import EventBus
from broadfast.core.events import HardCase, TeacherLabel, decode, pair_id
from broadfast.core.keys import labelled_key
from broadfast.teacher.worker import Labeler, already_labelled
from broadfast.core.budget import budget_status, read_teacher_rates
from broadfast.core.keys import backlog_key, claim_key, labeler_counts_key, labelled_pairs_key
from tests.conftest import read_topic
from broadfast.teacher.errors import TeacherUnavailable
from broadfast.teacher.mpcot import LLMTeacher
from broadfast.simulation.oracle import OracleTeacher
from broadfast.teacher.vllm_backend import VLLMEngine

pytestmark = pytest.mark.integration


def hard_case(query: str, ad_id: str, title: str, first_scored_ts: float | None = 100.0, ts: float | None = None) -> HardCase:
    """A hard case admitted now (or at ``ts``): the labeler drops those older than ``labeler_max_age_s``."""
    return HardCase(
        pair_id=pair_id(query, ad_id),
        query=query,
        ad_id=ad_id,
        title=title,
        reasons=["uncertain"],
        student_probs=(0.3, 0.4, 0.3),
        model_version="v1",
        ts=time.time() if ts is None else ts,
        first_scored_ts=first_scored_ts,
    )


def publish(settings: Settings, cases: list[HardCase]) -> None:
    with EventBus(settings) as bus:
        for c in cases:
            bus.publish(c)


def run_worker(settings: Settings, teacher, expect: int = 0) -> Labeler:
    """Run a worker until it consumed ``expect`` hard cases (or, with 0, until 6 empty polls)."""
    worker = Labeler(settings, teacher)
    try:
        worker.run(idle_polls=40 if expect else 6, max_records=expect or None)
    finally:
        worker.close()
    return worker


def committed_total(settings: Settings) -> int:
    """Sum of the labeler group's committed offsets over the hard-case partitions."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=settings.kafka.kafka_bootstrap, group_id=settings.teacher.labeler_group, enable_auto_commit=False)
    try:
        topic = settings.topic("hardcases")
        parts = consumer.partitions_for_topic(topic) or set()
        return sum(consumer.committed(TopicPartition(topic, p)) or 0 for p in parts)
    finally:
        consumer.close()


def test_worker_labels_each_hard_case_once_with_the_transformers_backend(bus_settings: Settings, tiny_engine) -> None:
    settings = bus_settings.model_copy(update={"labeler_batch": 8})
    cases = [
        hard_case("cordless drill", "a1", "DEWALT 20V MAX Cordless Drill", first_scored_ts=111.0),
        hard_case("paint roller", "a2", "Wooster 9 in. Roller Frame"),
        hard_case("deck screws", "a3", "GRK 2-1/2 in. Deck Screws (100-Pack)", first_scored_ts=None),
    ]
    publish(settings, cases + [cases[0]])  # the same hard case twice
    # the random tiny model is unsure of every grade: no mass minimum, so each perspective counts
    teacher = LLMTeacher(engine=tiny_engine, backend="transformers", max_tokens=8, min_mass=0.0)
    worker = run_worker(settings, teacher, expect=4)
    assert worker.stats.consumed == 4 and worker.stats.labelled == 3 and worker.stats.failed == 0

    records = read_topic(settings, "labels", expect=4, timeout_s=6)
    assert len(records) == 3, "one label per pair"
    labels = {r.key.decode(): decode("labels", r.value) for r in records}
    assert set(labels) == {c.pair_id for c in cases}
    for case in cases:
        lab: TeacherLabel = labels[case.pair_id]
        assert lab.teacher_id == teacher.teacher_id and lab.teacher_id.startswith("transformers:tiny-teacher")
        assert [p.name for p in lab.perspectives] == ["user_intent", "attributes", "business_rules"]
        assert all(p.rationale.strip() for p in lab.perspectives)
        emb = np.array(lab.rationale_embeddings)
        assert emb.shape == (3, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
        assert sum(lab.probs) == pytest.approx(1.0, abs=1e-3)
        assert lab.probs == pytest.approx(tuple(np.mean([p.probs for p in lab.perspectives], axis=0)), abs=1e-6)
        assert all(0.0 < p.mass < 1.0 for p in lab.perspectives) and lab.failed_perspectives == []
        assert lab.confidence == pytest.approx(float(np.mean([p.mass for p in lab.perspectives])), abs=1e-6)
        assert lab.grade is None  # a model's label has no human grade
        assert lab.first_scored_ts == case.first_scored_ts
        assert lab.query == case.query and lab.ad_id == case.ad_id

    client = redis.Redis.from_url(settings.redis.redis_url)
    key = labelled_key(settings, teacher.teacher_id)
    assert {k.decode() for k in client.hkeys(key)} == {c.pair_id for c in cases}
    assert already_labelled(client, settings, teacher.teacher_id, [cases[0].pair_id, "other"]) == {cases[0].pair_id}
    # the teacher-agnostic set the hard-case sampler's novelty check reads
    assert {k.decode() for k in client.smembers(labelled_pairs_key(settings))} == {c.pair_id for c in cases}

    # Later, the sampler sends the first pair again: the worker skips it (Redis), writes nothing.
    publish(settings, [cases[0]])
    again = run_worker(settings, teacher, expect=1)
    assert again.stats.consumed == 1 and again.stats.skipped == 1 and again.stats.labelled == 0
    assert len(read_topic(settings, "labels", expect=4, timeout_s=3)) == 3
    client.close()


def test_unlabellable_pairs_go_to_dead_letters_and_offsets_move_on(bus_settings: Settings) -> None:
    known, unknown = hard_case("hammer", "h1", "Estwing Hammer"), hard_case("saw", "s9", "Saw")
    oracle = OracleTeacher.from_frame(pd.DataFrame({"query": ["hammer"], "ad_id": ["h1"], "grade": [2]}), source="toy.parquet")
    publish(bus_settings, [known, unknown])
    worker = run_worker(bus_settings, oracle, expect=2)
    assert (worker.stats.labelled, worker.stats.failed) == (1, 1)

    [label_rec] = read_topic(bus_settings, "labels", expect=1)
    label = decode("labels", label_rec.value)
    assert label.pair_id == known.pair_id and label.teacher_id == "oracle:human-grades(toy.parquet)"
    assert label.probs[2] > 0.9
    assert (label.grade, label.confidence, label.perspectives[0].mass) == (2, 1.0, 1.0)

    [dl_rec] = read_topic(bus_settings, "deadletter", expect=1)
    letter = decode("deadletter", dl_rec.value)
    assert letter.source_topic == bus_settings.topic("hardcases") and letter.consumer == "labeler"
    assert "no human grade" in letter.error and unknown.pair_id in letter.error
    assert json.loads(letter.payload)["pair_id"] == unknown.pair_id  # nothing lost: the hard case is kept
    assert letter.offset is not None

    # Offsets were committed for both (the dead-lettered one too): the group moves on.
    assert committed_total(bus_settings) == 2


def test_unreachable_teacher_commits_nothing_so_the_case_is_read_again(bus_settings: Settings) -> None:
    import socket

    case = hard_case("hammer", "h1", "Estwing Hammer")
    publish(bus_settings, [case])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    down = LLMTeacher(engine=VLLMEngine(f"http://127.0.0.1:{dead_port}/v1", "m", retries=0, timeout_s=1.0), backend="vllm")
    with pytest.raises(TeacherUnavailable):
        run_worker(bus_settings, down, expect=1)
    assert committed_total(bus_settings) == 0
    assert read_topic(bus_settings, "labels", timeout_s=2) == []
    assert read_topic(bus_settings, "deadletter", timeout_s=2) == []

    oracle = OracleTeacher.from_frame(pd.DataFrame({"query": ["hammer"], "ad_id": ["h1"], "grade": [1]}), source="toy.parquet")
    again = run_worker(bus_settings, oracle, expect=1)
    assert again.stats.consumed == 1 and again.stats.labelled == 1


def test_cli_worker_with_the_oracle(bus_settings: Settings, shared_data, monkeypatch) -> None:
    from click.testing import CliRunner

    from broadfast.cli.main import main

    data = shared_data / "homedepot" / "dev.parquet"
    row = load_pairs(data).iloc[0]
    case = hard_case(row["query"], str(row["ad_id"]), row["title"])
    publish(bus_settings, [case, case])
    env = {
        "BROADFAST_KAFKA_BOOTSTRAP": bus_settings.kafka.kafka_bootstrap,
        "BROADFAST_KAFKA_FLAVOR": "tansu",
        "BROADFAST_REDIS_URL": bus_settings.redis.redis_url,
        "BROADFAST_TOPIC_PREFIX": bus_settings.kafka.topic_prefix,
        "BROADFAST_TEACHER_ORACLE_DATA": str(data),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    res = CliRunner().invoke(main, ["label", "--teacher", "oracle", "--idle-exit", "40", "--max-records", "2"])
    assert res.exit_code == 0, res.output
    assert '"labelled": 1' in res.output and '"skipped": 1' in res.output
    [rec] = read_topic(bus_settings, "labels", expect=1)
    lab = decode("labels", rec.value)
    assert lab.teacher_id == "oracle:human-relevance(homedepot/dev.parquet)"
    assert lab.grade == int(row["grade"]) and lab.confidence == 1.0
    assert int(np.argmax(lab.probs)) == int(row["grade"])  # row 0: relevance 2.67 of [1, 3], grade 2


def test_a_stale_hard_case_is_dropped_and_counted_not_labelled(bus_settings: Settings, caplog) -> None:
    settings = bus_settings.model_copy(update={"labeler_max_age_s": 60.0})
    now = time.time()
    fresh = [hard_case("hammer", "h1", "Estwing Hammer"), hard_case("saw", "s1", "Saw", ts=now - 50)]
    stale = hard_case("drill", "d1", "Drill", ts=now - 120)  # waited two minutes in the queue
    client = redis.Redis.from_url(settings.redis.redis_url)
    for case in [*fresh, stale]:  # what the sampler left when it admitted them
        client.set(claim_key(settings, case.pair_id), f"{settings.topic('scored')}:0:1")
        client.zadd(backlog_key(settings), {case.pair_id: case.ts})
    publish(settings, [fresh[0], stale, fresh[1]])
    oracle = OracleTeacher.from_frame(
        pd.DataFrame({"query": ["hammer", "saw", "drill"], "ad_id": ["h1", "s1", "d1"], "grade": [2, 1, 0]}), source="toy.parquet"
    )
    with caplog.at_level(logging.INFO, logger="broadfast.teacher.worker"):
        worker = run_worker(settings, oracle, expect=3)
    assert (worker.stats.consumed, worker.stats.labelled, worker.stats.dropped_stale, worker.stats.failed) == (3, 2, 1, 0)

    labels = [decode("labels", r.value) for r in read_topic(settings, "labels", expect=3, timeout_s=4)]
    assert sorted(lab.pair_id for lab in labels) == sorted(c.pair_id for c in fresh), "the stale case must not be labelled"
    assert read_topic(settings, "deadletter", timeout_s=2) == [], "a stale case is not malformed: no dead letter"
    assert committed_total(settings) == 3, "its offset moves on all the same"
    # counted where the demo reads it, and in the summary line
    assert int(client.hget(labeler_counts_key(settings), "dropped_stale")) == 1
    assert int(client.hget(labeler_counts_key(settings), "labelled")) == 2
    assert budget_status(client, settings)["dropped_stale"] == 1
    assert any("1 dropped as stale" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    # its claim and backlog entry are released (it may be sampled again); the labelled ones leave the backlog, keep their claims
    assert client.exists(claim_key(settings, stale.pair_id)) == 0
    assert all(client.exists(claim_key(settings, c.pair_id)) == 1 for c in fresh)
    assert client.zcard(backlog_key(settings)) == 0
    assert not client.sismember(labelled_pairs_key(settings), stale.pair_id)
    client.close()


def test_the_worker_reports_its_measured_rate_and_removes_it_when_it_stops(bus_settings: Settings) -> None:
    cases = [hard_case("hammer", "h1", "Estwing Hammer"), hard_case("saw", "s1", "Saw")]
    publish(bus_settings, cases)
    oracle = OracleTeacher.from_frame(pd.DataFrame({"query": ["hammer", "saw"], "ad_id": ["h1", "s1"], "grade": [2, 1]}), source="toy.parquet")
    client = redis.Redis.from_url(bus_settings.redis.redis_url)
    worker = Labeler(bus_settings, oracle)
    try:
        worker.run(idle_polls=40, max_records=2)
        [report] = read_teacher_rates(client, bus_settings, time.time())
        assert report.worker == worker.worker_id and report.teacher_id == oracle.teacher_id
        assert report.rate == pytest.approx(2 / worker.stats.seconds_busy) and report.rate == worker.stats.rate
        assert report.expires >= time.time() + bus_settings.teacher.labeler_rate_ttl_s - 5
    finally:
        worker.close()
    assert read_teacher_rates(client, bus_settings, time.time()) == [], "a stopped labeler's rate no longer counts"
    client.close()
