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

from broadfast.settings import Settings
from streams.labeler import Labeler
from streams.stack import EmbeddedStack
from tests.conftest import read_topic
from tests.teacher.test_worker import hard_case, publish
from training.teacher.oracle import OracleTeacher

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
    oracle = OracleTeacher.from_frame(pd.DataFrame({"query": ["hammer", "saw"], "product_id": ["h1", "s1"], "grade": [2, 1]}), source="toy.parquet")
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
