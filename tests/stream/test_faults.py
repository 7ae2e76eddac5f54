"""Faults: the scoring server and the stream worker across a broker restart.

Each test runs its own embedded stack (``own_stack``), so restarting its broker disturbs no other
test. The restarted broker is empty (its log is in memory): events it had acknowledged are gone with
it — that is the development broker. What must hold: scoring never waits on Kafka, every Scored event
the server produces is acknowledged or counted as dropped, and the stream worker counts what comes
after the restart.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
import redis
import torch

from broadfast.core.settings import Settings
from broadfast.core.bus import EventBus
from broadfast.stream.counters import StreamCounters, window_start
from broadfast.core.events import decode
from broadfast.devstack.stack import EmbeddedStack
from tests.conftest import read_topic
from tests.serving.conftest import metric, running, score_body
from tests.stream.test_app_worker import FLAT, SURE, counted, sc, start_worker, stop, wait_counted
from tests.teacher.test_broker_restart import own_stack  # noqa: F401 - the fixture
from broadfast.model.student import StudentConfig, build_student, save_student

pytestmark = pytest.mark.integration

SENT, DROPPED, PAIRS = "broadfast_serving_scored_events_sent_total", "broadfast_serving_scored_events_dropped_total", "broadfast_serving_pairs_scored_total"


def accounting(page: str) -> tuple[float, float, float]:
    return metric(page, PAIRS), metric(page, SENT), metric(page, DROPPED)


def test_scoring_goes_on_across_a_broker_restart_and_every_scored_event_is_accounted_for(own_stack: tuple[EmbeddedStack, Settings], tmp_path: Path) -> None:  # noqa: F811
    stack, base = own_stack
    torch.manual_seed(0)
    model = save_student(build_student(StudentConfig.tiny()), tmp_path / "m")
    settings = base.model_copy(update={"serve_features": False, "registry_root": tmp_path / "registry"})
    statuses: list[int] = []
    failures: list[BaseException] = []
    with running(settings, model) as (url, engine):
        stop_sending = threading.Event()

        def send() -> None:
            with httpx.Client(base_url=url, timeout=10) as client:
                while not stop_sending.is_set():
                    try:
                        statuses.append(client.post("/v1/score", json=score_body("claw hammer", ["Estwing hammer", "Hand saw", "Nails"])).status_code)
                    except Exception as exc:  # noqa: BLE001 - the test reports it
                        failures.append(exc)
                    time.sleep(0.05)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        time.sleep(2.0)
        stopped_at = time.time()
        stack.restart_broker(down_s=1.0)
        restarted_at = time.time()
        time.sleep(8.0)
        stop_sending.set()
        sender.join(timeout=30)
        assert not failures, f"requests failed: {failures[:3]!r}"
        assert len(statuses) >= 100 and set(statuses) == {200}, f"{len(statuses)} requests, statuses {set(statuses)}"
        deadline = time.monotonic() + 30  # the drain: every future resolves (acknowledged or dropped)
        while True:
            pairs, sent, dropped = accounting(httpx.get(f"{url}/metrics").text)
            if pairs == sent + dropped or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert pairs == 3 * len(statuses)
        assert pairs == sent + dropped, f"{pairs - sent - dropped:.0f} of {pairs:.0f} scored events neither acknowledged nor counted as dropped"
    pairs, sent, dropped = accounting(engine.metrics.render().decode())  # type: ignore[attr-defined]  # after the server stopped (and drained)
    assert pairs == sent + dropped
    after = [decode("scored", r.value) for r in read_topic(settings, "scored", timeout_s=5)]
    print(f"{len(statuses)} requests, {pairs:.0f} pairs: {sent:.0f} acknowledged ({len(after)} on the new broker), {dropped:.0f} dropped (counted)")
    # the new broker holds only what was scored after the old one stopped (some of it while no broker was up)
    assert all(ev.ts >= stopped_at - 0.5 for ev in after) and any(ev.ts > restarted_at for ev in after)  # type: ignore[attr-defined]
    assert len(after) <= sent


def test_the_stream_worker_survives_a_broker_restart_and_counts_what_comes_after(own_stack: tuple[EmbeddedStack, Settings], tmp_path: Path) -> None:  # noqa: F811
    stack, base = own_stack
    settings = base.model_copy(
        update={"stream_web_port": 0, "stream_push_features": False, "stream_budget_burst": 10_000.0, "stream_batch_size": 20, "stream_long_tail_min_traffic": 10**9,
                "stream_max_queue_s": 1e9, "stream_explore_share": 0.0, "home": tmp_path}
    )  # fmt: skip
    now = time.time()
    before = [sc(i, "q before", f"b{i}", SURE, now) for i in range(10)]
    after = [sc(100 + i, f"q after {i}", f"a{i}", FLAT, now) for i in range(10)]  # uncertain: each leaves a hard case
    log_path = tmp_path / "worker.log"
    proc = start_worker(settings, log_path)
    client = redis.Redis.from_url(settings.redis.redis_url)
    counters = StreamCounters(settings, client)
    win = window_start(now, settings.stream.stream_counter_window_s)

    def scored_of(events: list) -> int:
        return sum(v.scored for v in counters.read({("ad", e.ad_id): win for e in events}).values())

    try:
        with EventBus(settings) as bus:
            for ev in before:
                bus.publish(ev)
        wait_counted(settings, len(before), proc, log_path)
        assert scored_of(before) == len(before)
        time.sleep(1.5)  # the worker commits
        stack.restart_broker(down_s=1.0)
        with EventBus(settings) as bus:
            for ev in after:
                bus.publish(ev)
            bus.flush()
            assert bus.delivered == len(after)
        cases: list = [decode("hardcases", r.value) for r in read_topic(settings, "hardcases", expect=len(after), timeout_s=45)]
        assert proc.poll() is None, f"the worker exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
        assert sorted(c.ad_id for c in cases) == sorted(e.ad_id for e in after), f"the worker did not process the events sent after the restart:\n{log_path.read_text()[-3000:]}"
        deadline = time.monotonic() + 5  # a batch's counts are applied right after its hard cases are flushed
        while scored_of(after) < len(after) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert scored_of(after) == len(after), f"{scored_of(after)} of {len(after)} events sent after the restart counted (marks {counters.high_water_marks()}, counted() = {counted(settings)})"
    finally:
        stop(proc)
        client.close()


def test_a_batch_no_record_of_which_can_be_processed_stops_the_worker_before_its_offsets_move(own_stack: tuple[EmbeddedStack, Settings], tmp_path: Path) -> None:  # noqa: F811
    """Redis goes away: every record of the next batch fails, on its own too. The worker must not
    dead-letter them (not their fault) nor go on and commit past them: it exits 75, and a worker
    started once Redis is back reads the batch again and counts it."""
    from broadfast.stream.app import EXIT_STUCK

    stack, base = own_stack
    settings = base.model_copy(update={"stream_web_port": 0, "stream_push_features": False, "stream_batch_size": 20, "stream_long_tail_min_traffic": 10**9, "home": tmp_path})
    now = time.time()
    first = [sc(i, "q first", f"f{i}", SURE, now) for i in range(10)]
    stuck = [sc(200 + i, "q stuck", f"s{i}", SURE, now) for i in range(10)]
    log_path = tmp_path / "worker.log"
    proc = start_worker(settings, log_path)
    try:
        with EventBus(settings) as bus:
            for ev in first:
                bus.publish(ev)
        wait_counted(settings, len(first), proc, log_path)
        time.sleep(3.5)  # faust commits the first batch's offsets
        stack.stop_service("redis")
        with EventBus(settings) as bus:
            for ev in stuck:
                bus.publish(ev)
        assert proc.wait(timeout=90) == EXIT_STUCK, log_path.read_text()[-3000:]
        assert "every record fails on its own: stopping the worker now" in log_path.read_text()
        assert read_topic(settings, "deadletter", timeout_s=2) == []  # not the records' fault
    finally:
        stop(proc)
    stack.restart("redis")  # back, empty (no persistence here): what gets counted now is what is read again
    proc = start_worker(settings, log_path)
    try:
        client = redis.Redis.from_url(settings.redis.redis_url)
        counters = StreamCounters(settings, client)
        win = window_start(now, settings.stream.stream_counter_window_s)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(v.scored for v in counters.read({("ad", e.ad_id): win for e in stuck}).values()) < len(stuck):
            assert proc.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.3)
        assert sum(v.scored for v in counters.read({("ad", e.ad_id): win for e in stuck}).values()) == len(stuck), "the stuck batch was not read again"
        client.close()
    finally:
        stop(proc)
