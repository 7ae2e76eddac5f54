"""Faults: the labeling worker and the online trainer keep working across a broker restart.

Each test runs its own embedded stack (broker and Redis on free loopback ports), so restarting
its broker disturbs no other test. The embedded broker keeps its log in memory: the restarted one
is empty, its topics are created again, and the group's committed offsets are gone — the hardest
case for a consumer (its member id, generation and offsets are all unknown to the new broker).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from broadfast.core.settings import Settings
from broadfast.teacher.worker import Labeler
from broadfast.devstack.stack import EmbeddedStack
from tests.conftest import read_topic
from tests.teacher.test_worker import hard_case, publish
from broadfast.simulation.oracle import OracleTeacher

pytestmark = pytest.mark.integration


@pytest.fixture
def own_stack(tmp_path: Path) -> Iterator[tuple[EmbeddedStack, Settings]]:
    base = Settings(home=tmp_path, topic_partitions=1, topic_prefix="restart")
    stack = EmbeddedStack(base)
    state, _ = stack.up()
    try:
        yield stack, base.model_copy(update={"kafka_bootstrap": state.env["BROADFAST_KAFKA_BOOTSTRAP"], "kafka_flavor": "tansu", "redis_url": state.env["BROADFAST_REDIS_URL"]})
    finally:
        stack.down()


def test_the_labeler_survives_a_broker_restart_and_labels_what_comes_after(own_stack: tuple[EmbeddedStack, Settings]) -> None:
    stack, settings = own_stack
    oracle = OracleTeacher.from_frame(pd.DataFrame({"query": ["hammer", "saw"], "ad_id": ["h1", "s1"], "grade": [2, 1]}), source="toy.parquet")
    before, after = hard_case("hammer", "h1", "Estwing Hammer"), hard_case("saw", "s1", "Hand saw")
    publish(settings, [before])
    worker = Labeler(settings, oracle)
    failure: list[BaseException] = []

    def work() -> None:
        try:
            worker.run(max_records=2)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            failure.append(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        assert len(read_topic(settings, "labels", expect=1, timeout_s=60)) == 1
        time.sleep(1.0)  # the worker commits on its idle polls
        stack.restart_broker(down_s=1.0)
        publish(settings, [after])
        thread.join(timeout=120)
        assert not failure, f"the labeler died: {failure[0]!r}"
        assert not thread.is_alive(), "the labeler did not get the hard case sent after the restart"
        assert worker.stats.labelled == 2
        labels = read_topic(settings, "labels", expect=1, timeout_s=30)  # the restarted broker holds only what came after
        assert [lab.key for lab in labels] == [after.pair_id.encode()]
    finally:
        worker.close()


def test_the_online_trainer_survives_a_broker_restart_and_publishes_again(own_stack: tuple[EmbeddedStack, Settings], tmp_path: Path) -> None:
    from broadfast.core import events as ev
    from tests.training.test_online import labels_for, tiny_data
    from broadfast.training.online import run_online
    from broadfast.model.registry import Registry
    from broadfast.model.student import StudentConfig, build_student, save_student

    stack, base = own_stack
    data = tiny_data(tmp_path)
    settings = base.model_copy(update={
        "online_round_labels": 20, "online_round_wait_s": 1.0, "online_passes": 1, "online_batch_size": 10, "online_replay_fraction": 0.0,
        "online_publish_every_s": 0.0, "online_gate_tolerance": 1.0, "online_val_share": 0.3, "online_val_pairs": 30, "train_device": "cpu",
    })  # fmt: skip  (the gate is wide open: this test is about the broker, the gate has its own tests)
    registry = Registry(settings)
    registry.publish(save_student(build_student(StudentConfig.tiny()), tmp_path / "v0"), announce=False)
    stop, out, failure = threading.Event(), {}, []

    def work() -> None:
        try:
            out["trainer"] = run_online(settings, stop=stop, val_data=data)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            failure.append(exc)

    publish(settings, labels_for(data, 0, 60))  # type: ignore[arg-type]
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 90
        while len(registry.manifests()) < 2 and time.monotonic() < deadline and not failure:
            time.sleep(0.2)
        assert len(registry.manifests()) >= 2, f"no version published before the restart {failure}"
        time.sleep(1.5)  # idle polls: the trainer commits
        stack.restart_broker(down_s=1.0)
        before = len(registry.manifests())
        publish(settings, labels_for(data, 60, 60))  # type: ignore[arg-type]
        deadline = time.monotonic() + 90
        while len(registry.manifests()) <= before and time.monotonic() < deadline and not failure:
            time.sleep(0.2)
        assert not failure, f"the trainer died: {failure[0]!r}"
        assert len(registry.manifests()) > before, "the trainer published nothing after the broker restart"
        stop.set()  # no publish races the checks below
        thread.join(timeout=60)
        latest = registry.show(registry.champion())
        assert latest.trained_on["labels"] > registry.manifests()[1].trained_on["labels"]
        assert [ev.decode("models", r.value).version for r in read_topic(settings, "models", expect=1, timeout_s=10)][-1] == latest.version
    finally:
        stop.set()
        thread.join(timeout=60)


def test_replay_across_a_broker_restart_accounts_for_every_event(own_stack: tuple[EmbeddedStack, Settings]) -> None:
    """Every event the frontend sends is either acknowledged or counted as lost — none is silently
    assumed sent. (Events the old broker had acknowledged are gone with its in-memory log: that is
    the embedded development broker, not the producer; a broker with a disk keeps them.)"""
    from broadfast.core.bus import EventBus
    from broadfast.simulation.replay import Replayer, plan_requests
    from tests.simulation.test_replay import tiny_pairs

    stack, settings = own_stack
    result: dict = {}
    with EventBus(settings) as bus:
        thread = threading.Thread(target=lambda: result.setdefault("stats", Replayer(bus, seed=2).run(plan_requests(tiny_pairs(), limit=240, seed=2), rate=20.0, flush_timeout_s=20)), daemon=True)
        thread.start()
        time.sleep(1.0)
        stack.restart_broker(down_s=1.0)
        thread.join(timeout=120)
        stats = result["stats"]
        assert stats.requests == 240
        assert bus.pending == 0 and stats.events_delivered + stats.events_lost == bus.sent  # nothing unaccounted for
        after_restart = len(read_topic(settings, "requests", timeout_s=5)) + len(read_topic(settings, "clicks", timeout_s=5))
        assert 0 < after_restart <= stats.events_delivered  # the new broker holds what was acknowledged after the restart
    assert ("LOST" in stats.summary()) == (stats.events_lost > 0)
