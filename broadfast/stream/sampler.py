"""Hard-case sampling: hardness reasons, a labeling budget that follows the teacher, de-dup per pair.

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

A hard pair is then claimed for ``stream_dedup_ttl_s`` (de-dup per pair id) and must be
*admitted* by the labeling budget (:class:`LabelingBudget`, shared by every worker through Redis):

* **rate** — a token bucket (capacity ``stream_budget_burst``) refilled at the rate the
  teacher actually labels: the sum of the rates the labelers measure and report under
  :func:`teacher_rate_key` (stale reports ignored), clamped to
  [``stream_budget_min_per_s``, ``stream_budget_max_per_s``]; before any labeler has reported,
  ``stream_budget_per_s`` is the starting rate;
* **backlog** — the pairs admitted and not yet labelled, failed or dropped (the sorted set
  :func:`backlog_key`, pair id → admission time; entries older than ``labeler_max_age_s``
  no longer count, the labeler drops those unlabelled anyway). Nothing is admitted while
  the backlog holds ``rate × stream_max_queue_s`` pairs (at least 1), so the
  ``hardcases`` queue stays a few seconds of the teacher's work long;
* **hardest first, with a random share** — within a batch the tokens go to the candidates
  with the highest :func:`hardness_score`, not to the first ones to arrive; but a share
  ``stream_explore_share`` of the slots goes to a candidate drawn at random from *all* the
  batch's never-labelled pairs (hard or not: those that are not hard are ``explore``
  candidates, reachable only this way), and at most ``stream_per_query_cap`` per query
  (:func:`admission_order`). Labels of uncertain pairs only are a biased sample: in the demo a
  student trained on them alone got worse on a random validation slice after a few minutes.

A candidate that gets no token (or no backlog room) releases its claim and may be sampled
when it comes again.

The budget itself lives in :mod:`broadfast.core.budget`, the Redis key names in :mod:`broadfast.core.keys`.
The pure parts (:func:`hardness_reasons`, :func:`hardness_score`) hold no state and no I/O;
:class:`HardCaseSampler` applies them to batches of scored events with their state in Redis.

>>> reasons = hardness_reasons((0.34, 0.33, 0.33), HardnessConfig(), labelled=False)
>>> reasons
['uncertainty', 'novel']
>>> is_hard(reasons, HardnessConfig())
True
>>> is_hard(hardness_reasons((0.9, 0.05, 0.05), HardnessConfig(), labelled=False), HardnessConfig())
False
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from broadfast.core.settings import Settings, StreamSettings
from broadfast.core.budget import LabelingBudget
from broadfast.core.events import HardCase, Scored, normalize_query, pair_id
from broadfast.core.keys import claim_key, labelled_pairs_key, stream_key

log = logging.getLogger(__name__)

UNCERTAINTY = "uncertainty"
DISAGREEMENT = "arm_disagreement"
LONG_TAIL = "long_tail"
NOVEL = "novel"
EXPLORE = "explore"  # not hard: admitted by the random share of the budget (see admission_order)
EXPLORE_RANK = 10.0  # explore candidates rank below every hard one in the hardest-first slots
SIGNALS = (UNCERTAINTY, DISAGREEMENT, LONG_TAIL)
ARMS = ("champion", "challenger")


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
    def from_settings(cls, stream: StreamSettings) -> HardnessConfig:
        return cls(
            entropy_threshold=stream.stream_entropy_threshold,
            margin_threshold=stream.stream_margin_threshold,
            disagreement_threshold=stream.stream_disagreement_threshold,
            long_tail_max_requests=stream.stream_long_tail_max_requests,
            long_tail_min_traffic=stream.stream_long_tail_min_traffic,
            sample_novel=stream.stream_sample_novel,
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


LONG_TAIL_BONUS = 0.25
MARGIN_TIE_BREAK = 1e-3


def hardness_score(probs: Sequence[float], *, disagreement: float | None = None, long_tail: bool = False) -> float:
    """How hard a pair is, higher first: the order in which a batch's candidates get tokens.

    ``normalized_entropy(probs)`` (0 sure … 1 uniform) − ``0.001 × margin(probs)`` (among
    equally flat distributions, two grades in a tie come first) + the size of the arm
    disagreement ``|score − other arm's score|`` (0 … 1, 0 when only one arm scored) +
    ``0.25`` for a long-tail query. So roughly 0 … 2.25: a pair uncertain *and* disputed by
    the two arms outranks one that is only uncertain. The first term is what
    ``benchmarks/online.py`` ranks its pool by.

    >>> hardness_score((1/3, 1/3, 1/3)) > hardness_score((0.45, 0.45, 0.10)) > hardness_score((0.9, 0.05, 0.05))
    True
    >>> hardness_score((0.9, 0.05, 0.05), disagreement=0.8) > hardness_score((0.34, 0.33, 0.33))
    True
    >>> round(hardness_score((0.9, 0.05, 0.05), long_tail=True) - hardness_score((0.9, 0.05, 0.05)), 6)
    0.25
    """
    score = normalized_entropy(probs) - MARGIN_TIE_BREAK * margin(probs)
    if disagreement is not None:
        score += abs(disagreement)
    if long_tail:
        score += LONG_TAIL_BONUS
    return score


def admission_order(hardness: Sequence[float], queries: Sequence[str], explore_share: float, per_query: int, rng: Any) -> tuple[list[int], list[int]]:
    """The order in which a batch's candidates ask the budget, and those left out by the per-query cap.

    Hardest first, except that each slot goes, with probability ``explore_share``, to a candidate
    drawn at random from those left (uncertainty alone over-samples one region: a random share
    keeps the labels representative); at most ``per_query`` candidates of one query (diversity:
    the ads of one uncertain query tend to be uncertain together). ``rng`` is a
    ``numpy.random.Generator``. Returns positions into the inputs.

    >>> import numpy as np
    >>> admission_order([0.1, 0.9, 0.5, 0.8], ["a", "a", "a", "b"], 0.0, 2, np.random.default_rng(0))
    ([1, 3, 2], [0])
    """
    left = sorted(range(len(hardness)), key=lambda i: -hardness[i])  # stable: ties keep batch order
    order: list[int] = []
    capped: list[int] = []
    taken: dict[str, int] = {}
    while left:
        pick = int(rng.integers(0, len(left))) if explore_share > 0 and rng.random() < explore_share else 0
        i = left.pop(pick)
        if taken.get(queries[i], 0) >= per_query:
            capped.append(i)
            continue
        taken[queries[i]] = taken.get(queries[i], 0) + 1
        order.append(i)
    return order, capped


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
    over_budget: int = 0  # fresh hard cases refused for want of a token
    backlog_full: int = 0  # fresh hard cases refused because the backlog was full
    explore: int = 0  # novel pairs that were not hard: candidates of the random share only
    per_query_capped: int = 0  # fresh hard cases left out: their query had its share of the batch already
    labelled: int = 0
    rate: float = 0.0  # the budget's refill rate at the last admission (hard cases/s)
    rate_measured: bool = False  # whether that rate came from the labelers (else the starting rate)
    backlog: int = 0  # the backlog before the last admission
    backlog_limit: int = 0  # its bound at that rate

    def as_dict(self) -> dict[str, float]:
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
    value: the source offset that claimed it); ``budget`` (the token bucket) and ``backlog``
    (:class:`LabelingBudget`). Every write is idempotent, so replaying a batch after a crash
    leaves the same state, and a replayed event whose claim it made itself is emitted again (at
    least once) without spending a token nor entering the backlog again.

    The batch's fresh hard cases ask the budget hardest first (:func:`hardness_score`, ties in
    batch order); the admitted ones are returned hardest first too, so the labeler reads them
    in that order. Those refused (no token, or the backlog full) release their claims.
    """

    def __init__(self, settings: Settings, client: Any, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.client = client
        self.clock = clock
        self.cfg = HardnessConfig.from_settings(settings.stream)
        self.budget = LabelingBudget(settings, client)
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
        window = s.stream.stream_long_tail_window_s
        # 1. one script call: record this batch's state and read what the reasons need.
        queries = [normalize_query(ev.query) for ev, _ in batch]
        keys = [self._labelled, self._requests] + [stream_key(s, "pair", pid) for pid in ids]
        argv: list[Any] = [s.stream.stream_arm_ttl_s, window, len(batch)]
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
        hardness: dict[int, float] = {}
        for i, ((ev, _), (hm, labelled)) in enumerate(zip(batch, pair_state)):
            other = ARMS[1] if ev.arm == ARMS[0] else ARMS[0]
            other_raw = hm[1 + ARMS.index(other)]
            other_score = float(other_raw) if other_raw is not None else None
            q_requests, all_requests = request_counts[(queries[i], ev.request_id)]
            reasons = hardness_reasons(
                ev.grade_probs,
                self.cfg,
                labelled=labelled,
                score=ev.score,
                other_arm_score=other_score,
                query_requests=q_requests,
                window_requests=all_requests,
            )
            self.stats.scored += 1
            self.stats.labelled += labelled
            disagreement = ev.score - other_score if other_score is not None else None
            if is_hard(reasons, self.cfg):
                self.stats.hard += 1
                candidates.append((i, reasons))
                hardness[i] = hardness_score(ev.grade_probs, disagreement=disagreement, long_tail=LONG_TAIL in reasons)
            elif NOVEL in reasons and s.stream.stream_explore_share > 0:
                # not hard, never labelled: only the random share of the slots can reach it, so that
                # share is drawn from all new traffic and the labels are not all uncertain ones
                self.stats.explore += 1
                candidates.append((i, [EXPLORE, NOVEL]))
                hardness[i] = hardness_score(ev.grade_probs) - EXPLORE_RANK
        if not candidates:
            return []
        # 3. de-dup claims: new, replayed (claimed by this very source offset) or duplicate.
        status = self._claim_script(
            keys=[claim_key(s, ids[i]) for i, _ in candidates],
            args=[s.stream.stream_dedup_ttl_s] + [batch[i][1].marker() for i, _ in candidates],
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
        # 4. the budget, hardest first (with a random share, at most a few per query): the first
        #    `granted` fresh claims in that order are sent, the rest released.
        now = self.clock()
        granted = 0
        if fresh:
            rng = np.random.default_rng(int.from_bytes(hashlib.blake2b(batch[fresh[0]][1].marker().encode(), digest_size=8).digest(), "big"))
            pos, capped = admission_order([hardness[i] for i in fresh], [queries[i] for i in fresh], s.stream.stream_explore_share, s.stream.stream_per_query_cap, rng)
            release = [fresh[p] for p in capped]
            fresh = [fresh[p] for p in pos]
            self.stats.per_query_capped += len(capped)
            if fresh:
                admission = self.budget.admit(now, [ids[i] for i in fresh])
                granted = admission.granted
                emit.update(fresh[:granted])
                self.stats.over_budget += admission.no_token
                self.stats.backlog_full += admission.no_room
                self.stats.rate, self.stats.rate_measured = admission.rate, admission.measured is not None
                self.stats.backlog, self.stats.backlog_limit = admission.backlog, admission.limit
                release += fresh[granted:]
            if release:
                self.client.delete(*[claim_key(s, ids[i]) for i in release])
        out = []
        for i, reasons in sorted(candidates, key=lambda c: -hardness[c[0]]):
            if i not in emit:
                continue
            ev, _ = batch[i]
            first_raw = pair_state[i][0][0]
            out.append(
                HardCase(
                    pair_id=ids[i],
                    query=ev.query,
                    ad_id=ev.ad_id,
                    title=ev.title,
                    text=ev.text,
                    reasons=reasons,
                    student_probs=ev.grade_probs,
                    model_version=ev.model_version,
                    ts=now,
                    first_scored_ts=min(float(first_raw), ev.ts) if first_raw is not None else ev.ts,
                )
            )
        self.stats.emitted += granted
        return out
