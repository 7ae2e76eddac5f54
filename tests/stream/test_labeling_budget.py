"""The labeling budget follows the teacher: the refill rate is the rate the labelers measured
(shared through Redis), the backlog of admitted-but-unlabelled hard cases is bounded, and the
tokens of a batch go to its hardest candidates first.

Unit tests of the pure parts (fake clock), then the sampler and a real labeler on the real
Redis and broker of the fixtures, with a fake clock shared by both."""

from __future__ import annotations

import pandas as pd
import pytest
import redis

from broadfast.core.settings import Settings
from broadfast.core.bus import Delivery
from broadfast.core.events import HardCase, Scored, pair_id
from broadfast.teacher.worker import Labeler, RateMeter
from broadfast.core.budget import (
    backlog_limit,
    budget_rate,
    budget_status,
    measured_teacher_rate,
    RateReport,
    read_teacher_rates,
    release_stale,
    TokenBucket,
    write_teacher_rate,
)
from broadfast.core.keys import backlog_key, claim_key, teacher_rate_key
from broadfast.stream.sampler import HardCaseSampler, hardness_score, Source
from broadfast.simulation.oracle import OracleTeacher

FLAT = (1 / 3, 1 / 3, 1 / 3)
TIE = (0.45, 0.45, 0.10)
SURE_NO = (0.9, 0.05, 0.05)
SURE_YES = (0.05, 0.15, 0.8)


class FakeClock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# -- unit: the pure parts --------------------------------------------------------------------
def test_the_refill_rate_is_the_measured_one_clamped_and_starts_at_the_starting_rate() -> None:
    s = Settings(stream_budget_per_s=2.0, stream_budget_min_per_s=0.05, stream_budget_max_per_s=20.0)
    assert budget_rate(s, None) == 2.0  # no labeler has reported yet
    assert budget_rate(s, 0.1) == 0.1
    assert budget_rate(s, 0.001) == 0.05 and budget_rate(s, 1e4) == 20.0
    assert budget_rate(s, float("nan")) == 2.0
    assert budget_rate(Settings(stream_budget_per_s=50.0, stream_budget_max_per_s=20.0), None) == 20.0


def test_the_backlog_bound_is_rate_times_max_queue_and_at_least_one() -> None:
    s = Settings(stream_max_queue_s=20.0)
    assert backlog_limit(s, 2.0) == 40 and backlog_limit(s, 0.1) == 2 and backlog_limit(s, 0.001) == 1


def test_rate_meter_counts_busy_time_only_over_a_window() -> None:
    clock = FakeClock(0.0)
    meter = RateMeter(window_s=60.0)
    # 4 pairs in 20 busy seconds, then 10 minutes idle (an empty queue), then 3 pairs in 6 s
    clock.t += 20
    meter.add(clock.t, busy_s=20.0, pairs=4)
    assert meter.rate() == pytest.approx(0.2)
    clock.t += 600
    assert meter.rate() == pytest.approx(0.2), "idle time is not the teacher's slowness"
    clock.t += 6
    meter.add(clock.t, busy_s=6.0, pairs=3)
    assert meter.rate() == pytest.approx(0.5), "batches older than the window are forgotten"
    assert meter.longest_busy_s == 6.0


def test_the_bucket_refills_at_the_rate_the_meter_measured() -> None:
    """The chain the sampler applies, by hand: measured rate → clamp → bucket refill."""
    s = Settings(stream_budget_per_s=2.0, stream_budget_min_per_s=0.01, stream_budget_max_per_s=20.0)
    meter = RateMeter(window_s=60.0)
    meter.add(10.0, busy_s=10.0, pairs=1)  # a slow teacher: 0.1 pairs/s
    bucket = TokenBucket(rate=budget_rate(s, meter.rate()), capacity=20.0, tokens=0.0, last=0.0)
    assert bucket.take_upto(9.0, 5) == 0 and bucket.take_upto(10.0, 5) == 1
    assert bucket.take_upto(40.0, 5) == 3
    start = TokenBucket(rate=budget_rate(s, None), capacity=20.0, tokens=0.0, last=0.0)
    assert start.take_upto(10.0, 50) == 20  # the starting rate would have admitted 20


def test_hardness_orders_disagreement_and_flatness_above_mild_doubt() -> None:
    flat, tie, mild, sure = hardness_score(FLAT), hardness_score(TIE), hardness_score((0.5, 0.45, 0.05)), hardness_score(SURE_NO)
    assert flat > tie > mild > sure
    disputed = hardness_score(SURE_YES, disagreement=0.875 - 0.075)
    assert disputed > flat
    assert hardness_score(SURE_NO, long_tail=True) > sure


# -- integration: real Redis (and broker), fake clock ----------------------------------------
def scored(i: int, query: str, probs, *, ad: str = "a", arm: str = "champion", ts: float = 1_000.0) -> Scored:
    return Scored(
        request_id=f"r{i}", ts=ts + i, query=query, ad_id=ad, title=f"title {ad}", position=0,
        score=probs[2] + 0.5 * probs[1], grade_probs=probs, model_version="v1", arm=arm, latency_ms=1.0,
    )


def batch(events, start: int = 0):
    return [(ev, Source("scored", 0, start + i)) for i, ev in enumerate(events)]


@pytest.fixture
def client(bus_settings):
    c = redis.Redis.from_url(bus_settings.redis.redis_url)
    yield c
    c.close()


class SlowOracle:
    """The oracle, taking ``seconds_per_pair`` of the fake clock per pair (the teacher's speed)."""

    def __init__(self, clock: FakeClock, seconds_per_pair: float, queries: list[str]) -> None:
        self.clock, self.seconds_per_pair = clock, seconds_per_pair
        self.oracle = OracleTeacher.from_frame(pd.DataFrame({"query": queries, "ad_id": ["a"] * len(queries), "grade": [1] * len(queries)}), source="toy.parquet")
        self.teacher_id = self.oracle.teacher_id

    def label(self, pairs):
        self.clock.t += self.seconds_per_pair * len(pairs)
        return self.oracle.label(pairs)


def deliveries(settings: Settings, cases: list[HardCase], start: int = 0) -> list[Delivery]:
    return [Delivery(c, settings.topic("hardcases"), 0, start + i, c.pair_id.encode()) for i, c in enumerate(cases)]


@pytest.mark.integration
def test_the_budget_refill_follows_the_rate_the_labeler_writes(bus_settings, client) -> None:
    settings = bus_settings.model_copy(
        update={"stream_budget_per_s": 2.0, "stream_budget_min_per_s": 0.01, "stream_budget_max_per_s": 100.0, "stream_budget_burst": 3.0, "stream_max_queue_s": 1e6}
    )
    clock = FakeClock()
    sampler = HardCaseSampler(settings, client, clock=clock)
    # before any labeler reported: the starting rate, the bucket starts full
    assert [h.query for h in sampler.process(batch([scored(i, f"w{i}", FLAT) for i in range(5)]))] == ["w0", "w1", "w2"]
    assert sampler.stats.rate == 2.0 and not sampler.stats.rate_measured

    # a labeler whose teacher takes 4 s per pair labels 4 pairs: it measures and writes 0.25 pairs/s
    teacher = SlowOracle(clock, 4.0, ["w0", "w1", "w2", "extra"])
    labeler = Labeler(settings, teacher, clock=clock)
    hard = [HardCase(pair_id=pair_id(q, "a"), query=q, ad_id="a", title="t", reasons=["uncertainty"], student_probs=FLAT, model_version="v1", ts=clock.t)
            for q in ["w0", "w1", "w2", "extra"]]
    try:
        labeler.process(deliveries(settings, hard))
        assert labeler.stats.labelled == 4 and clock.t == 1_000_016.0
        [report] = read_teacher_rates(client, settings, clock.t)
        assert report.rate == pytest.approx(0.25) and report.teacher_id == teacher.teacher_id and report.worker == labeler.worker_id
        assert measured_teacher_rate(client, settings, clock.t) == pytest.approx(0.25)

        # the 16 s of labelling refilled the bucket (burst 3); empty it, then it refills at 0.25/s:
        # 8 s give 2 tokens, where the starting rate (2/s) would have given all 3 back
        assert len(sampler.process(batch([scored(10 + i, f"v{i}", FLAT) for i in range(5)], start=10))) == 3
        assert sampler.stats.rate == pytest.approx(0.25) and sampler.stats.rate_measured
        clock.t += 8.0
        got = sampler.process(batch([scored(20 + i, f"x{i}", FLAT) for i in range(5)], start=20))
        assert [h.query for h in got] == ["x0", "x1"]
        clock.t += 4.0
        assert len(sampler.process(batch([scored(30 + i, f"y{i}", FLAT) for i in range(5)], start=30))) == 1

        # a second labeler's rate adds up; an expired report (a dead labeler) does not count
        write_teacher_rate(client, settings, RateReport("other", 0.5, clock.t, clock.t + 60.0, "oracle:other"))
        client.hset(teacher_rate_key(settings), "dead", '{"rate": 50.0, "ts": 0.0, "expires": 1.0, "teacher_id": "x"}')
        assert measured_teacher_rate(client, settings, clock.t) == pytest.approx(0.75)
        clock.t += 2.0
        assert len(sampler.process(batch([scored(40 + i, f"z{i}", FLAT) for i in range(5)], start=40))) == 1  # 0.75/s × 2 s = 1.5
        status = budget_status(client, settings, clock.t)
        assert status["rate"] == pytest.approx(0.75) and status["rate_source"] == "measured" and status["labelers"] == 2
        # later the other labeler has stopped reporting (its report expired); this one renewed its own
        clock.t += 61.0
        labeler.report_rate()
        assert client.hexists(teacher_rate_key(settings), "dead") == 0 and client.hexists(teacher_rate_key(settings), "other") == 0, "a writer prunes expired reports"
        assert measured_teacher_rate(client, settings, clock.t) == pytest.approx(0.25)
    finally:
        labeler.close()
    # the labeler stopped: no rate reported, back to the starting rate
    # every report gone or expired: back to the starting rate
    assert measured_teacher_rate(client, settings, clock.t) is None
    assert budget_status(client, settings, clock.t)["rate_source"] == "start"


@pytest.mark.integration
def test_nothing_is_admitted_while_the_backlog_is_full(bus_settings, client) -> None:
    # a teacher at 0.1 pairs/s with a 20 s queue: at most 2 hard cases waiting; tokens are plenty
    settings = bus_settings.model_copy(
        update={"stream_budget_per_s": 0.1, "stream_budget_min_per_s": 0.01, "stream_budget_burst": 100.0, "stream_max_queue_s": 20.0, "labeler_max_age_s": 60.0}
    )
    clock = FakeClock()
    sampler = HardCaseSampler(settings, client, clock=clock)
    first = sampler.process(batch([scored(i, f"q{i}", FLAT) for i in range(5)]))
    assert len(first) == 2 and sampler.stats.backlog_full == 3 and sampler.stats.over_budget == 0
    assert client.zcard(backlog_key(settings)) == 2
    refused = [pair_id(f"q{i}", "a") for i in range(5) if pair_id(f"q{i}", "a") not in {h.pair_id for h in first}]
    assert not any(client.exists(claim_key(settings, p)) for p in refused), "refused candidates release their claims"

    clock.t += 30.0  # tokens refill, the backlog does not drain by itself
    assert sampler.process(batch([scored(10 + i, f"r{i}", FLAT) for i in range(5)], start=10)) == []
    assert sampler.stats.backlog_full == 8 and sampler.stats.backlog == 2 and sampler.stats.backlog_limit == 2

    # the labeler answers one of the two: one place frees up, exactly one more is admitted
    labeler = Labeler(settings, SlowOracle(clock, 10.0, [first[0].query]), clock=clock)
    try:
        labeler.process(deliveries(settings, [first[0]]))
    finally:
        labeler.close()
    assert client.zcard(backlog_key(settings)) == 1
    assert len(sampler.process(batch([scored(20 + i, f"s{i}", FLAT) for i in range(5)], start=20))) == 1

    # cases admitted longer ago than labeler_max_age_s no longer count (the labeler drops them)
    clock.t += 61.0
    assert len(sampler.process(batch([scored(30 + i, f"t{i}", FLAT) for i in range(5)], start=30))) == 2


@pytest.mark.integration
def test_within_a_batch_the_hardest_candidates_get_the_tokens(bus_settings, client) -> None:
    settings = bus_settings.model_copy(
        update={"stream_budget_per_s": 1e-6, "stream_budget_min_per_s": 1e-6, "stream_budget_burst": 2.0, "stream_max_queue_s": 1e12, "stream_long_tail_min_traffic": 10**9, "stream_explore_share": 0.0}
    )
    clock = FakeClock()
    sampler = HardCaseSampler(settings, client, clock=clock)
    events = [
        scored(0, "mild", (0.5, 0.45, 0.05)),  # uncertain by margin only: the least hard
        scored(1, "tie", TIE),
        scored(2, "ab", SURE_NO, ad="x", arm="champion"),  # sure, but ...
        scored(3, "flat", FLAT),  # the flattest
        scored(4, "ab", SURE_YES, ad="x", arm="challenger"),  # ... the challenger disagrees by 0.8
    ]
    got = sampler.process(batch(events))
    assert [h.query for h in got] == ["ab", "flat"], "the two hardest, hardest first, not the first two to arrive"
    assert sampler.stats.over_budget == 2
    assert not client.exists(claim_key(settings, pair_id("mild", "a"))) and not client.exists(claim_key(settings, pair_id("tie", "a")))
    # refused ones come back later and get a token then
    client.hset(f"{settings.kafka.topic_prefix}:stream:budget", mapping={"tokens": "1", "last": repr(clock.t)})
    again = sampler.process(batch([scored(10, "mild", (0.5, 0.45, 0.05)), scored(11, "tie", TIE)], start=10))
    assert [h.query for h in again] == ["tie"]


@pytest.mark.integration
@pytest.mark.parametrize("share", [0.0, 1.0])
def test_the_random_share_reaches_new_pairs_that_are_not_hard(bus_settings, client, share: float) -> None:
    """Explore candidates (never labelled, not hard) get slots only through the random share."""
    settings = bus_settings.model_copy(
        update={"stream_budget_per_s": 1e-6, "stream_budget_min_per_s": 1e-6, "stream_budget_burst": 3.0, "stream_max_queue_s": 1e12,
                "stream_long_tail_min_traffic": 10**9, "stream_explore_share": share, "stream_per_query_cap": 100}
    )  # fmt: skip
    sampler = HardCaseSampler(settings, client, clock=FakeClock())
    events = [scored(i, f"sure{i}", SURE_YES) for i in range(12)] + [scored(12, "flat", FLAT)]
    got = sampler.process(batch(events))
    explored = [h for h in got if "explore" in h.reasons]
    if share == 0.0:
        assert [h.query for h in got] == ["flat"] and sampler.stats.explore == 0
    else:  # every slot random: the 3 tokens go to a uniform draw over all 13 new pairs
        assert len(got) == 3 and sampler.stats.explore == 12
        assert explored and all(h.reasons == ["explore", "novel"] for h in explored)


@pytest.mark.integration
def test_a_stale_copy_releases_only_its_own_admission(bus_settings, client) -> None:
    settings = bus_settings
    old, new = pair_id("old", "a"), pair_id("readmitted", "a")
    client.zadd(backlog_key(settings), {old: 100.0, new: 500.0})
    for p in (old, new):
        client.set(claim_key(settings, p), "scored:0:1")
    # both copies are stale as of ts 100; the second pair was admitted again at 500 since
    assert release_stale(client, settings, [(old, 100.0), (new, 100.0)]) == 1
    assert client.zrange(backlog_key(settings), 0, -1) == [new.encode()]
    assert not client.exists(claim_key(settings, old)) and client.exists(claim_key(settings, new))


@pytest.mark.integration
def test_concurrent_workers_never_overfill_the_backlog_nor_spend_a_token_twice(bus_settings) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from broadfast.core.budget import LabelingBudget

    # tokens: a burst of 50; backlog room: 1.5/s × 20 s = 30 — the backlog binds first
    settings = bus_settings.model_copy(update={"stream_budget_per_s": 1.5, "stream_budget_burst": 50.0, "stream_max_queue_s": 20.0})
    clients = [redis.Redis.from_url(settings.redis.redis_url) for _ in range(4)]
    budgets = [LabelingBudget(settings, c) for c in clients]

    def ask(w: int) -> int:
        return sum(budgets[w].admit(1_000.0, [f"w{w}-p{i}"]).granted for i in range(40))

    with ThreadPoolExecutor(4) as pool:
        granted = list(pool.map(ask, range(4)))
    assert sum(granted) == 30, granted
    assert clients[0].zcard(backlog_key(settings)) == 30
    assert budgets[0].tokens(1_000.0) == pytest.approx(20.0)
    for c in clients:
        c.close()


def test_admission_order_gives_a_random_share_and_caps_each_query() -> None:
    import numpy as np

    from broadfast.stream.sampler import admission_order

    hardness = list(np.linspace(1.0, 0.0, 200))  # candidate i is the i-th hardest
    queries = [f"q{i // 4}" for i in range(200)]  # 50 queries of 4 candidates
    order, capped = admission_order(hardness, queries, 0.0, 2, np.random.default_rng(0))
    assert order == [i for i in range(200) if i % 4 < 2] and capped == [i for i in range(200) if i % 4 >= 2]
    first_50 = []
    for seed in range(20):
        order, _ = admission_order(hardness, [str(i) for i in range(200)], 0.3, 1000, np.random.default_rng(seed))
        assert sorted(order) == list(range(200))
        first_50.append(sum(i >= 50 for i in order[:50]))  # slots that went beyond the 50 hardest
    # about 30% of the first 50 slots are random draws, and most of those land outside the hardest 50
    assert 6 <= np.mean(first_50) <= 16, first_50
