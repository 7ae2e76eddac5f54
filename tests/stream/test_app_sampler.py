"""The stream processor on the real broker and Redis (no faust loop): hard cases, budget,
de-dup, replay after a crash, counters, dead letters. The faust worker itself is tested in
test_stream_app_worker.py."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import redis

from broadfast.stream.app import StreamProcessor
from broadfast.core.events import Click, HardCase, Scored, decode, encode, pair_id
from broadfast.core.keys import labelled_pairs_key, stream_key
from broadfast.stream.sampler import DISAGREEMENT, LONG_TAIL, NOVEL, UNCERTAINTY
from tests.conftest import read_topic

pytestmark = pytest.mark.integration

FLAT = (0.34, 0.33, 0.33)  # uncertain (entropy)
TIE = (0.45, 0.45, 0.10)  # uncertain (margin)
SURE_NO = (0.9, 0.05, 0.05)
SURE_YES = (0.05, 0.15, 0.8)


def scored(i: int, query: str, ad: str, probs, *, arm: str = "champion", request: str | None = None, ts: float | None = None) -> Scored:
    return Scored(
        request_id=request or f"r{i}", ts=ts if ts is not None else 1_000.0 + i, query=query, ad_id=ad, title=f"title {ad}", text=f"description of {ad}", position=0,
        score=probs[2] + 0.5 * probs[1], grade_probs=probs, model_version="v1", arm=arm, latency_ms=1.0,
    )


def records(settings, short: str, events, *, partition: int = 0, start: int = 0):
    return [(settings.topic(short), partition, start + i, encode(ev)) for i, ev in enumerate(events)]


@pytest.fixture
def make_processor(bus_settings):
    made = []

    def make(**overrides):
        # a bucket that never refills (no labeler reports a rate: the starting rate is used) and a
        # backlog bound these tests never reach (1e-6/s × 1e9 s = 1000 cases); the budget's own tests set theirs
        base = {"stream_push_features": False, "stream_budget_per_s": 1e-6, "stream_budget_min_per_s": 1e-6, "stream_budget_burst": 100.0, "stream_max_queue_s": 1e9, "stream_explore_share": 0.0}
        settings = bus_settings.model_copy(update=base | overrides)
        p = StreamProcessor(settings)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def hardcases(settings, expect: int, timeout_s: float = 10.0) -> list[HardCase]:
    return [decode("hardcases", r.value) for r in read_topic(settings, "hardcases", expect=expect, timeout_s=timeout_s)]


def test_known_probabilities_give_exactly_the_expected_hard_cases(make_processor) -> None:
    p = make_processor(stream_long_tail_min_traffic=3, stream_long_tail_max_requests=1)
    s = p.settings
    client = redis.Redis.from_url(s.redis.redis_url)
    client.sadd(labelled_pairs_key(s), pair_id("drill", "labelled"))
    events = [
        scored(0, "drill", "flat", FLAT, request="r0"),
        scored(1, "drill", "tie", TIE, request="r0"),
        scored(2, "drill", "sure", SURE_NO, request="r1"),
        scored(3, "drill", "labelled", FLAT, request="r1"),  # uncertain but already labelled: never resent
        scored(4, "drill", "ab", SURE_NO, request="r2", arm="champion"),
        scored(5, "drill", "ab", SURE_YES, request="r3", arm="challenger"),  # disagrees with the champion
        scored(6, "Rare  Query", "x", SURE_NO, request="r4"),  # 1 request of its query among 5 in the window
        scored(7, "drill", "flat", FLAT, request="r5"),  # same pair again: de-duplicated
    ]
    p.process("scored", records(s, "scored", events))
    got = {(h.ad_id, tuple(h.reasons)) for h in hardcases(s, expect=4)}
    assert got == {
        ("flat", (UNCERTAINTY, NOVEL)),
        ("tie", (UNCERTAINTY, NOVEL)),
        ("ab", (DISAGREEMENT, NOVEL)),
        ("x", (LONG_TAIL, NOVEL)),
    }
    cases = hardcases(s, expect=5, timeout_s=2.0)
    assert len(cases) == 4, "the repeated pair must not be sent twice"
    flat = next(h for h in cases if h.ad_id == "flat")
    assert flat.pair_id == pair_id("drill", "flat") and flat.student_probs == FLAT and flat.first_scored_ts == 1_000.0
    assert (flat.title, flat.text) == ("title flat", "description of flat"), "the teacher and the trainer must read what the student read"
    assert p.sampler.stats.duplicates == 1 and p.sampler.stats.labelled == 1


def test_budget_caps_hard_cases_and_a_dropped_pair_can_come_back(make_processor) -> None:
    p = make_processor(stream_budget_burst=3.0)
    s = p.settings
    events = [scored(i, f"q{i}", "a", FLAT) for i in range(10)]
    p.process("scored", records(s, "scored", events))
    assert sorted(h.query for h in hardcases(s, expect=3)) == ["q0", "q1", "q2"]  # the first three of the batch
    assert p.sampler.stats.over_budget == 7
    # budget refilled (by hand: the bucket's state lives in Redis): a dropped pair is sampled when it comes again
    redis.Redis.from_url(s.redis.redis_url).delete(stream_key(s, "budget"))
    p.process("scored", records(s, "scored", [scored(20, "q5", "a", FLAT)], start=10))
    assert sorted(h.query for h in hardcases(s, expect=4)) == ["q0", "q1", "q2", "q5"]


def test_replay_after_a_crash_resends_hard_cases_without_counting_twice(make_processor) -> None:
    p = make_processor()
    s = p.settings
    events = [scored(i, f"q{i % 3}", f"a{i}", FLAT if i % 2 else SURE_NO) for i in range(12)]
    batch = records(s, "scored", events)
    p.process("scored", batch)
    marks = p.counters.high_water_marks()
    counts = {k: v for k, v in redis.Redis.from_url(s.redis.redis_url).hgetall(p.counters.counter_key(0)).items()}
    # the worker died before committing: a new one reads the same batch again
    p2 = make_processor()
    p2.process("scored", batch)
    assert p2.counters.high_water_marks() == marks
    assert redis.Redis.from_url(s.redis.redis_url).hgetall(p.counters.counter_key(0)) == counts
    assert p2.stats.counted == 0
    cases = hardcases(s, expect=12)
    per_pair = Counter(h.pair_id for h in cases)
    assert set(per_pair) == {pair_id(e.query, e.ad_id) for e in events if e.grade_probs == FLAT}
    assert set(per_pair.values()) == {2}, "a replayed hard case is re-sent (at least once), never dropped"
    assert p2.sampler.stats.replayed == 6 and p2.sampler.budget.tokens(0) >= 0


def test_counters_match_a_hand_computation(make_processor) -> None:
    p = make_processor(stream_counter_window_s=100)
    s = p.settings
    sc = [scored(0, "drill", "a1", SURE_NO, ts=10.0), scored(1, "Drill", "a2", SURE_NO, ts=20.0), scored(2, "saw", "a1", SURE_NO, ts=150.0)]
    clicks = [
        Click(request_id="r", ts=11.0, query="drill", ad_id="a1", position=0, clicked=True),
        Click(request_id="r", ts=12.0, query="drill", ad_id="a2", position=1, clicked=False),
        Click(request_id="r", ts=13.0, query="drill ", ad_id="a1", position=0, clicked=False),
        Click(request_id="r", ts=160.0, query="saw", ad_id="a1", position=0, clicked=True),
    ]
    p.process("scored", records(s, "scored", sc[:2], partition=0) + records(s, "scored", sc[2:], partition=1))
    p.process("clicks", records(s, "clicks", clicks, partition=2))
    w0 = {("ad", "a1"): 0, ("ad", "a2"): 0, ("query", "drill"): 0}
    w1 = {("ad", "a1"): 100, ("query", "saw"): 100}
    v0, v1 = p.counters.read(w0), p.counters.read(w1)
    # window [0, 100): a1 scored 1, shown 2, clicked 1; a2 scored 1, shown 1; "drill" scored 2, shown 3, clicked 1
    assert (v0[("ad", "a1")].scored, v0[("ad", "a1")].impressions, v0[("ad", "a1")].clicks) == (1, 2, 1)
    assert (v0[("ad", "a2")].scored, v0[("ad", "a2")].impressions, v0[("ad", "a2")].clicks) == (1, 1, 0)
    assert (v0[("query", "drill")].scored, v0[("query", "drill")].impressions, v0[("query", "drill")].ctr) == (2, 3, pytest.approx(1 / 3))
    # window [100, 200)
    assert (v1[("ad", "a1")].scored, v1[("ad", "a1")].impressions, v1[("ad", "a1")].ctr) == (1, 1, 1.0)
    assert v1[("query", "saw")].clicks == 1
    assert p.counters.high_water_marks() == {f"{s.topic('scored')}:0": 1, f"{s.topic('scored')}:1": 0, f"{s.topic('clicks')}:2": 3}


def test_malformed_records_go_to_dead_letters_and_the_batch_goes_on(make_processor) -> None:
    p = make_processor()
    s = p.settings
    good = records(s, "scored", [scored(0, "drill", "a1", FLAT)])
    bad_prob = json.loads(encode(scored(1, "drill", "a2", FLAT)))
    bad_prob["grade_probs"] = [0.9, 0.9, 0.9]
    topic = s.topic("scored")
    batch = [(topic, 0, 5, b"\xff\xfe not utf8"), (topic, 0, 6, b'{"half": '), (topic, 0, 7, json.dumps(bad_prob).encode()), (topic, 0, 8, None)] + [
        (topic, 0, 9, good[0][3])
    ]
    p.process("scored", batch)
    letters = [decode("deadletter", r.value) for r in read_topic(s, "deadletter", expect=4)]
    assert sorted(d.offset for d in letters) == [5, 6, 7, 8]
    assert all(d.source_topic == topic and d.consumer == "stream" for d in letters)
    assert any("grade_probs" in d.error for d in letters) and any("UTF-8" in d.error for d in letters)
    assert [h.ad_id for h in hardcases(s, expect=1)] == ["a1"]
    assert p.stats.counted == 1


def test_a_record_that_fails_on_its_own_is_dead_lettered_once_and_its_neighbours_go_on(make_processor) -> None:
    """Fault injection: the real counters raise for one ad (as a poison record would). Processed one
    by one, the other records are counted and the culprit alone is dead-lettered with its reason;
    when every record fails (Redis down, say) nothing is dead-lettered and the error is raised."""
    p = make_processor()
    s = p.settings
    batch = records(s, "scored", [scored(i, "drill", f"a{i}", SURE_NO) for i in range(5)], start=20)
    items = p.decode_batch("scored", batch)
    apply = p.counters.apply

    def poisoned(its):
        if any(event.ad_id == "a2" for event, _ in its):
            raise OverflowError("the injected fault")
        return apply(its)

    p.counters.apply = poisoned
    with pytest.raises(OverflowError):
        p.process_items("scored", items)  # the batch fails as a whole
    assert p.isolate("scored", items) == 1
    [letter] = [decode("deadletter", r.value) for r in read_topic(s, "deadletter", expect=1)]
    assert (letter.offset, letter.consumer) == (22, "stream") and "processing failed: OverflowError: the injected fault" in letter.error
    assert decode("scored", letter.payload.encode()).ad_id == "a2"  # the record is kept
    assert p.stats.counted == 4

    def down(its):
        raise ConnectionError("redis is down")

    p.counters.apply = down
    with pytest.raises(ConnectionError):
        p.isolate("scored", p.decode_batch("scored", records(s, "scored", [scored(9, "drill", "b1", SURE_NO), scored(10, "drill", "b2", SURE_NO)], start=40)))
    assert len(read_topic(s, "deadletter", expect=2, timeout_s=3)) == 1  # not the records' fault: none dead-lettered


def test_the_budget_is_shared_by_concurrent_workers(bus_settings) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from broadfast.core.budget import RedisTokenBucket

    key = stream_key(bus_settings, "budget")
    clients = [redis.Redis.from_url(bus_settings.redis.redis_url) for _ in range(4)]
    buckets = [RedisTokenBucket(c, key, rate=1e-6, capacity=50.0) for c in clients]

    def spend(bucket) -> int:
        return sum(bucket.take_upto(1_000.0, 1) for _ in range(40))

    with ThreadPoolExecutor(4) as pool:
        granted = list(pool.map(spend, buckets))
    assert sum(granted) == 50, granted  # 160 asks, one bucket of 50: never a token spent twice
    for c in clients:
        c.close()
