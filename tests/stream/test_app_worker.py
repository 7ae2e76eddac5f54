"""The real faust worker (`python -m broadfast.stream.app`, what `broadfast stream` runs) as a separate
process on the real broker and Redis: hard cases and dead letters end to end, counters
pushed to Feast, and kill -9 mid-stream followed by a restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import redis

from broadfast.core.bus import EventBus
from broadfast.stream.counters import StreamCounters, increments, window_start
from broadfast.core.events import Click, Scored, decode, pair_id
from broadfast.stream.sampler import UNCERTAINTY
from tests.conftest import read_topic

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
FLAT = (0.34, 0.33, 0.33)
SURE = (0.9, 0.05, 0.05)


def start_worker(settings, log_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROADFAST_")} | settings.public_env()
    out = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    return subprocess.Popen([sys.executable, "-m", "broadfast.stream.app"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def counted(settings) -> int:
    client = redis.Redis.from_url(settings.redis.redis_url)
    try:
        return int(sum(int(v) + 1 for v in client.hgetall(f"{settings.kafka.topic_prefix}:stream:hwm").values()))
    finally:
        client.close()


def wait_counted(settings, n: int, proc: subprocess.Popen, log_path: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if counted(settings) >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"the worker exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"only {counted(settings)} of {n} events counted in {timeout_s:.0f} s:\n{log_path.read_text()[-3000:]}")


def sc(i: int, query: str, ad: str, probs, ts: float) -> Scored:
    return Scored(request_id=f"r{i}", ts=ts, query=query, ad_id=ad, title=ad, position=0, score=probs[2] + 0.5 * probs[1], grade_probs=probs, model_version="v1", latency_ms=1.0)


def test_worker_end_to_end_with_dead_letters_and_feast_push(bus_settings, tmp_path) -> None:
    from broadfast.features.store import OnlineFeatures, apply

    settings = bus_settings.model_copy(
        update={"stream_web_port": 0, "stream_budget_burst": 100.0, "stream_batch_size": 50, "stream_long_tail_min_traffic": 10**9, "stream_explore_share": 0.0, "feast_data": tmp_path / "feast", "home": tmp_path}
    )
    apply(settings)
    events = [sc(i, f"query {i % 7}", f"ad{i % 11}", FLAT if i % 5 == 0 else SURE, 1_000.0 + i) for i in range(60)]
    clicks = [Click(request_id="c", ts=1_000.0 + i, query="query 1", ad_id="ad3", position=0, clicked=i % 4 == 0) for i in range(8)]
    with EventBus(settings) as bus:
        for ev in events[:30]:
            bus.publish(ev)
        bus.publish_raw("scored", b'{"not": "a scored event"}', key=b"query 1")
        bus.publish_raw("clicks", b"\x00garbage", key=b"query 1")
        for ev in events[30:] + clicks:
            bus.publish(ev)
    log_path = tmp_path / "worker.log"
    proc = start_worker(settings, log_path)
    try:
        wait_counted(settings, len(events) + len(clicks), proc, log_path)
        expected = {pair_id(e.query, e.ad_id) for e in events if e.grade_probs == FLAT}
        cases = [decode("hardcases", r.value) for r in read_topic(settings, "hardcases", expect=len(expected))]
        assert {c.pair_id for c in cases} == expected and len(cases) == len(expected)
        assert all(c.reasons == [UNCERTAINTY, "novel"] for c in cases)
        letters = [decode("deadletter", r.value) for r in read_topic(settings, "deadletter", expect=2)]
        assert sorted(d.source_topic for d in letters) == sorted([settings.topic("scored"), settings.topic("clicks")])
        # the counters reached the Feast online store
        deadline = time.monotonic() + 10
        reader = OnlineFeatures(settings)
        while True:
            row = reader.read("Query 1", ["ad3"])[0]
            if row["ad_impressions"] == 8 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        ad3_scored = sum(1 for e in events if e.ad_id == "ad3")
        assert (row["ad_impressions"], row["ad_clicks"], row["ad_scored"]) == (8, 2, ad3_scored)
        assert row["ad_ctr"] == pytest.approx(0.25) and row["query_impressions"] == 8
        assert row["ad_title_chars"] == 0.0  # ad3 is not in the data set: no attributes, read as 0
        assert proc.poll() is None, "the worker keeps running after dead letters"
    finally:
        stop(proc)


def test_kill_9_mid_stream_then_restart_loses_nothing_and_counts_once(bus_settings, tmp_path) -> None:
    settings = bus_settings.model_copy(
        update={"stream_web_port": 0, "stream_push_features": False, "stream_budget_burst": 10_000.0, "stream_batch_size": 40, "stream_long_tail_min_traffic": 10**9, "stream_counter_window_s": 60, "home": tmp_path,
                # no labeler runs here: without this the backlog bound (rate × max queue) would stop admission at 40
                "stream_max_queue_s": 1e9, "stream_explore_share": 0.0}
    )
    n = 3000
    events = [sc(i, f"q{i % 40}", f"a{i % 97}", FLAT if i % 9 == 0 else SURE, 1_000.0 + i * 0.1) for i in range(n)]
    clicks = [Click(request_id=f"r{i}", ts=1_000.0 + i * 0.1, query=f"q{i % 40}", ad_id=f"a{i % 97}", position=0, clicked=i % 3 == 0) for i in range(0, n, 2)]
    stream = [e for pair in zip(events[::2], clicks) for e in pair] + events[1::2]
    log_path = tmp_path / "worker.log"
    producer_done = threading.Event()

    def produce() -> None:
        with EventBus(settings) as bus:
            for i in range(150, len(stream), 150):  # ~6 s of traffic after the warm-up chunk
                for ev in stream[i : i + 150]:
                    bus.publish(ev)
                bus.flush()
                time.sleep(0.2)
        producer_done.set()

    first = start_worker(settings, log_path)
    producer = threading.Thread(target=produce, daemon=True)
    try:
        with EventBus(settings) as bus:  # a warm-up chunk: the worker has joined once it counts
            for ev in stream[:150]:
                bus.publish(ev)
        wait_counted(settings, 1, first, log_path)
        producer.start()
        wait_counted(settings, len(stream) // 4, first, log_path)
        assert not producer_done.is_set(), "the kill must land mid-stream"
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        at_kill = counted(settings)
        second = start_worker(settings, log_path)
        try:
            producer.join(60)
            wait_counted(settings, len(stream), second, log_path, timeout_s=90)
            assert at_kill < len(stream)
            # counters: exactly a hand computation over every event, none twice
            expected: Counter = Counter()
            for ev in stream:
                for kind, ent, name in increments(ev):
                    expected[(kind, ent, window_start(ev.ts, 60), name)] += 1
            client = redis.Redis.from_url(settings.redis.redis_url)
            counters = StreamCounters(settings, client)
            got: Counter = Counter()
            for win in {k[2] for k in expected}:
                for field, value in client.hgetall(counters.counter_key(win)).items():
                    kind, ent, name = field.decode().split(":", 2)
                    got[(kind, ent, win, name)] = int(value)
            assert got == expected
            # hard cases: every uncertain pair at least once (a replayed batch may re-send some)
            want = {pair_id(e.query, e.ad_id) for e in events if e.grade_probs == FLAT}
            cases = [decode("hardcases", r.value) for r in read_topic(settings, "hardcases", expect=len(want), timeout_s=20)]
            extra = [(c.query, c.ad_id, c.reasons, c.student_probs) for c in cases if c.pair_id not in want]
            assert not extra, extra[:5]
            assert {c.pair_id for c in cases} == want
            dupes = len(cases) - len(want)
            assert dupes <= len(want)
            print(f"kill -9 after {at_kill} of {len(stream)} events; {dupes} hard cases re-sent after the restart")
        finally:
            stop(second)
    finally:
        stop(first)
