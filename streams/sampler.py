"""Hard-case sampling: hardness reasons, a token-bucket labeling budget, de-dup per pair.

A scored pair is *hard* for the student when at least one of these holds:

* ``uncertainty`` — the grade distribution is flat: entropy / log(3) ≥
  ``stream_entropy_threshold``, or the top two probabilities are within
  ``stream_margin_threshold`` of each other;
* ``arm_disagreement`` — the champion and the challenger scored the same pair
  (within ``stream_arm_ttl_s``) and their scores differ by ≥ ``stream_disagreement_threshold``;
* ``long_tail`` — the query was searched at most ``stream_long_tail_max_requests`` times in
  the sliding event-time window of ``stream_long_tail_window_s`` (judged only once the
  window holds ``stream_long_tail_min_traffic`` requests, so a cold start is not all tail).

``novel`` (the pair was never labelled) is added to the reasons of a hard pair; a pair that
was labelled already is never sent again (the teacher has answered it), and with
``stream_sample_novel`` novelty alone makes a pair hard. The set of labelled pair ids is
the Redis set :func:`labelled_pairs_key` — the labeler adds each pair it labels to it.

A hard pair is then claimed for ``stream_dedup_ttl_s`` (de-dup per pair id) and costs one
token of the labeling budget (``stream_budget_per_s`` refill, ``stream_budget_burst``
capacity, shared by every worker through Redis). No token: the claim is released and the
pair may be sampled when it comes again.

The pure parts (:func:`hardness_reasons`, :class:`TokenBucket`) hold no state and no I/O;
:class:`HardCaseSampler` applies them to batches of scored events with their state in Redis.

>>> reasons = hardness_reasons((0.34, 0.33, 0.33), HardnessConfig(), labelled=False)
>>> reasons
['uncertainty', 'novel']
>>> is_hard(reasons, HardnessConfig())
True
>>> is_hard(hardness_reasons((0.9, 0.05, 0.05), HardnessConfig(), labelled=False), HardnessConfig())
False
>>> bucket = TokenBucket(rate=1.0, capacity=2.0, tokens=2.0, last=0.0)
>>> [bucket.take(0.0), bucket.take(0.0), bucket.take(0.0), bucket.take(1.0)]
[True, True, False, True]
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from broadfast.settings import Settings
from streams.events import HardCase, Scored, normalize_query, pair_id

log = logging.getLogger(__name__)

UNCERTAINTY = "uncertainty"
DISAGREEMENT = "arm_disagreement"
LONG_TAIL = "long_tail"
NOVEL = "novel"
SIGNALS = (UNCERTAINTY, DISAGREEMENT, LONG_TAIL)
ARMS = ("champion", "challenger")


# -- Redis keys (the one place that names them) ---------------------------------------------
def labelled_pairs_key(settings: Settings) -> str:
    """The Redis set of pair ids the teacher has labelled (``SADD`` by the labeler).

    >>> labelled_pairs_key(Settings(topic_prefix="relevance"))
    'relevance:labelled_pairs'
    """
    return f"{settings.topic_prefix}:labelled_pairs"


def stream_key(settings: Settings, *parts: str) -> str:
    """A key of the stream worker's own state: ``<prefix>:stream:<part>:…``."""
    return ":".join((settings.topic_prefix, "stream", *parts))


# -- pure hardness ------------------------------------------------------------------------
@dataclass(frozen=True)
class HardnessConfig:
    entropy_threshold: float = 0.9
    margin_threshold: float = 0.1
    disagreement_threshold: float = 0.25
    long_tail_max_requests: int = 1
    long_tail_min_traffic: int = 200
    sample_novel: bool = False

    @classmethod
    def from_settings(cls, s: Settings) -> HardnessConfig:
        return cls(
            entropy_threshold=s.stream_entropy_threshold,
            margin_threshold=s.stream_margin_threshold,
            disagreement_threshold=s.stream_disagreement_threshold,
            long_tail_max_requests=s.stream_long_tail_max_requests,
            long_tail_min_traffic=s.stream_long_tail_min_traffic,
            sample_novel=s.stream_sample_novel,
        )


def normalized_entropy(probs: Sequence[float]) -> float:
    """Entropy of the grade distribution divided by log(3): 0 certain … 1 uniform."""
    h = -sum(p * math.log(p) for p in probs if p > 0.0)
    return h / math.log(len(probs))


def margin(probs: Sequence[float]) -> float:
    """Top probability minus the second: small means the student hesitates between two grades."""
    top = sorted(probs, reverse=True)
    return top[0] - top[1]


def hardness_reasons(
    probs: Sequence[float],
    cfg: HardnessConfig,
    *,
    labelled: bool,
    score: float | None = None,
    other_arm_score: float | None = None,
    query_requests: int | None = None,
    window_requests: int | None = None,
) -> list[str]:
    """Why a scored pair is hard (possibly no reason), in a fixed order."""
    reasons: list[str] = []
    if normalized_entropy(probs) >= cfg.entropy_threshold or margin(probs) <= cfg.margin_threshold:
        reasons.append(UNCERTAINTY)
    if score is not None and other_arm_score is not None and abs(score - other_arm_score) >= cfg.disagreement_threshold:
        reasons.append(DISAGREEMENT)
    if (
        query_requests is not None
        and window_requests is not None
        and window_requests >= cfg.long_tail_min_traffic
        and query_requests <= cfg.long_tail_max_requests
    ):
        reasons.append(LONG_TAIL)
    if not labelled:
        reasons.append(NOVEL)
    return reasons


def is_hard(reasons: Sequence[str], cfg: HardnessConfig) -> bool:
    """Hard: never labelled, and a signal (or novelty alone, when ``sample_novel``)."""
    if NOVEL not in reasons:
        return False
    return cfg.sample_novel or any(r in SIGNALS for r in reasons)


# -- token bucket -----------------------------------------------------------------------------
def refill(tokens: float, last: float, now: float, rate: float, capacity: float) -> float:
    """Tokens after refilling from ``last`` to ``now`` at ``rate`` per second, capped."""
    return min(capacity, tokens + max(0.0, now - last) * rate)


@dataclass
class TokenBucket:
    """An in-process token bucket (the arithmetic :class:`RedisTokenBucket` shares)."""

    rate: float
    capacity: float
    tokens: float
    last: float

    def take(self, now: float, n: int = 1) -> bool:
        return self.take_upto(now, n) == n if n > 0 else True

    def take_upto(self, now: float, n: int) -> int:
        """Take as many of ``n`` whole tokens as there are; returns how many were taken."""
        self.tokens = refill(self.tokens, self.last, now, self.rate, self.capacity)
        self.last = max(self.last, now)
        granted = min(n, int(self.tokens + 1e-9))
        self.tokens -= granted
        return granted


class RedisTokenBucket:
    """The labeling budget shared by every stream worker: the bucket's state in one Redis hash.

    Updated with an optimistic transaction (WATCH/MULTI), so concurrent workers never
    spend a token twice; the arithmetic is :class:`TokenBucket`'s.
    """

    def __init__(self, client: Any, key: str, rate: float, capacity: float) -> None:
        self.client, self.key, self.rate, self.capacity = client, key, rate, capacity

    def take_upto(self, now: float, n: int) -> int:
        import redis

        if n <= 0:
            return 0
        while True:
            with self.client.pipeline() as pipe:
                try:
                    pipe.watch(self.key)
                    state = pipe.hgetall(self.key)
                    if state:
                        bucket = TokenBucket(self.rate, self.capacity, float(state[b"tokens"]), float(state[b"last"]))
                    else:
                        bucket = TokenBucket(self.rate, self.capacity, self.capacity, now)
                    granted = bucket.take_upto(now, n)
                    pipe.multi()
                    pipe.hset(self.key, mapping={"tokens": repr(bucket.tokens), "last": repr(bucket.last)})
                    pipe.execute()
                    return granted
                except redis.WatchError:
                    continue

    def tokens(self, now: float) -> float:
        state = self.client.hgetall(self.key)
        if not state:
            return self.capacity
        return refill(float(state[b"tokens"]), float(state[b"last"]), now, self.rate, self.capacity)


# -- the sampler over Redis state -----------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """Where an event was read: its claim marker makes a replay re-emit, not drop, a hard case."""

    topic: str
    partition: int
    offset: int

    def marker(self) -> str:
        return f"{self.topic}:{self.partition}:{self.offset}"


@dataclass
class SamplerStats:
    scored: int = 0
    hard: int = 0
    emitted: int = 0
    replayed: int = 0
    duplicates: int = 0
    over_budget: int = 0
    labelled: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


# The per-event state of a batch, in one server-side call (client-side pipelining of ~7
# commands per event cost ~5x more CPU in redis-py than the script).
# KEYS: labelled set, all-requests zset, one pair hash per event, one query zset per new request.
# ARGV: arm TTL, window (s), n, then per event: pair id, arm, score, ts, query index (0: the
# request was met earlier in the batch), request id.
# Returns per event: first_ts, champion score, challenger score, labelled (0/1),
# query requests in window, all requests in window (-1, -1 when not a new request).
_STATE = """
local labelled, requests = KEYS[1], KEYS[2]
local arm_ttl, window, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
local a = 4
for i = 1, n do
  local pk = KEYS[2 + i]
  local pid, arm, score, ts, qidx, rid = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], tonumber(ARGV[a + 4]), ARGV[a + 5]
  a = a + 6
  redis.call('HSETNX', pk, 'first_ts', ts)
  redis.call('HSET', pk, arm, score)
  redis.call('EXPIRE', pk, arm_ttl)
  local hm = redis.call('HMGET', pk, 'first_ts', 'champion', 'challenger')
  local qc, ac = -1, -1
  if qidx > 0 then
    local lo = '(' .. string.format('%.17g', tonumber(ts) - window)
    local qk = KEYS[2 + n + qidx]
    for _, k in ipairs({qk, requests}) do
      redis.call('ZADD', k, ts, rid)
      redis.call('ZREMRANGEBYSCORE', k, '-inf', lo)
      redis.call('EXPIRE', k, math.floor(window) + 1)
    end
    qc = redis.call('ZCARD', qk)
    ac = redis.call('ZCARD', requests)
  end
  out[#out + 1] = hm[1]
  out[#out + 1] = hm[2]
  out[#out + 1] = hm[3]
  out[#out + 1] = redis.call('SISMEMBER', labelled, pid)
  out[#out + 1] = qc
  out[#out + 1] = ac
end
return out
"""


# De-dup claims of a batch's hard pairs. KEYS: one claim key per pair; ARGV: TTL, then one
# marker (source topic:partition:offset) per key. Returns per key: 1 claimed now, 2 already
# claimed by this same marker (a replay after a crash), 0 claimed by another event.
CLAIM_DUPLICATE, CLAIM_NEW, CLAIM_REPLAY = 0, 1, 2
_CLAIM = """
local out = {}
for i = 1, #KEYS do
  local marker = ARGV[i + 1]
  if redis.call('SET', KEYS[i], marker, 'NX', 'EX', ARGV[1]) then
    out[i] = 1
  elseif redis.call('GET', KEYS[i]) == marker then
    out[i] = 2
  else
    out[i] = 0
  end
end
return out
"""


class HardCaseSampler:
    """Turns batches of scored events into :class:`HardCase` events (the caller publishes them).

    Redis state (all under ``<prefix>:stream:``): per pair a hash ``pair:<pair_id>`` with the
    first scored time and each arm's last score (TTL ``stream_arm_ttl_s``); per normalised query
    a sorted set ``q:<query>`` of request ids by event time, and ``requests`` for all queries
    (the sliding long-tail window); ``claim:<pair_id>`` (de-dup, TTL ``stream_dedup_ttl_s``,
    value: the source offset that claimed it); ``budget`` (the token bucket). Every write is
    idempotent, so replaying a batch after a crash leaves the same state, and a replayed event
    whose claim it made itself is emitted again (at least once) without spending a token.
    """

    def __init__(self, settings: Settings, client: Any, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.client = client
        self.clock = clock
        self.cfg = HardnessConfig.from_settings(settings)
        self.budget = RedisTokenBucket(client, stream_key(settings, "budget"), settings.stream_budget_per_s, settings.stream_budget_burst)
        self.stats = SamplerStats()
        self._labelled = labelled_pairs_key(settings)
        self._requests = stream_key(settings, "requests")
        self._state_script = client.register_script(_STATE)
        self._claim_script = client.register_script(_CLAIM)

    def process(self, batch: Sequence[tuple[Scored, Source]]) -> list[HardCase]:
        """Rate a batch (in partition order) and return the hard cases to publish, in order."""
        if not batch:
            return []
        s = self.settings
        ids = [pair_id(ev.query, ev.ad_id) for ev, _ in batch]
        window = s.stream_long_tail_window_s
        # 1. one script call: record this batch's state and read what the reasons need.
        queries = [normalize_query(ev.query) for ev, _ in batch]
        keys = [self._labelled, self._requests] + [stream_key(s, "pair", pid) for pid in ids]
        argv: list[Any] = [s.stream_arm_ttl_s, window, len(batch)]
        request_index: dict[tuple[str, str], int] = {}
        for (ev, _), pid, q in zip(batch, ids, queries):
            req = (q, ev.request_id)
            qidx = 0
            if req not in request_index:  # the ~50 pairs of one request share one window update
                keys.append(stream_key(s, "q", q))
                request_index[req] = qidx = len(request_index) + 1
            argv += [pid, ev.arm, repr(ev.score), repr(ev.ts), qidx, ev.request_id]
        replies = self._state_script(keys=keys, args=argv)
        pair_state, request_counts = [], {}
        for i, ((ev, _), q) in enumerate(zip(batch, queries)):
            first_ts, champion, challenger, labelled, q_card, all_card = replies[6 * i : 6 * i + 6]
            pair_state.append(((first_ts, champion, challenger), bool(labelled)))
            if q_card >= 0:
                request_counts[(q, ev.request_id)] = (int(q_card), int(all_card))
        # 2. reasons.
        candidates: list[tuple[int, list[str]]] = []
        for i, ((ev, _), (hm, labelled)) in enumerate(zip(batch, pair_state)):
            other = ARMS[1] if ev.arm == ARMS[0] else ARMS[0]
            other_raw = hm[1 + ARMS.index(other)]
            q_requests, all_requests = request_counts[(queries[i], ev.request_id)]
            reasons = hardness_reasons(
                ev.grade_probs,
                self.cfg,
                labelled=labelled,
                score=ev.score,
                other_arm_score=float(other_raw) if other_raw is not None else None,
                query_requests=q_requests,
                window_requests=all_requests,
            )
            self.stats.scored += 1
            self.stats.labelled += labelled
            if is_hard(reasons, self.cfg):
                self.stats.hard += 1
                candidates.append((i, reasons))
        if not candidates:
            return []
        # 3. de-dup claims: new, replayed (claimed by this very source offset) or duplicate.
        status = self._claim_script(
            keys=[stream_key(s, "claim", ids[i]) for i, _ in candidates],
            args=[s.stream_dedup_ttl_s] + [batch[i][1].marker() for i, _ in candidates],
        )
        fresh, emit = [], set()
        for (i, _), st in zip(candidates, status):
            if st == CLAIM_NEW:
                fresh.append(i)
            elif st == CLAIM_REPLAY:
                emit.add(i)
                self.stats.replayed += 1
            else:
                self.stats.duplicates += 1
        # 4. the budget: the first `granted` fresh claims are sent, the rest released.
        granted = self.budget.take_upto(self.clock(), len(fresh))
        emit.update(fresh[:granted])
        if granted < len(fresh):
            self.stats.over_budget += len(fresh) - granted
            self.client.delete(*[stream_key(s, "claim", ids[i]) for i in fresh[granted:]])
        out = []
        for i, reasons in candidates:
            if i not in emit:
                continue
            ev, _ = batch[i]
            first_raw = pair_state[i][0][0]
            out.append(
                HardCase(
                    pair_id=ids[i],
                    query=ev.query,
                    ad_id=ev.ad_id,
                    ad_title=ev.ad_title,
                    reasons=reasons,
                    student_probs=ev.grade_probs,
                    model_version=ev.model_version,
                    ts=self.clock(),
                    first_scored_ts=min(float(first_raw), ev.ts) if first_raw is not None else ev.ts,
                )
            )
        self.stats.emitted += granted
        return out
