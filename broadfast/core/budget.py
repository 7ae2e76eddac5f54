"""The labeling budget: a token bucket refilled at the teacher's measured rate, and a bound on the backlog.

* **rate** — a token bucket (capacity ``stream_budget_burst``) refilled at the rate the
  teacher actually labels: the sum of the rates the labelers measure and report under
  :func:`broadfast.core.keys.teacher_rate_key` (stale reports ignored), clamped to
  [``stream_budget_min_per_s``, ``stream_budget_max_per_s``]; before any labeler has reported,
  ``stream_budget_per_s`` is the starting rate;
* **backlog** — the pairs admitted and not yet labelled, failed or dropped (the sorted set
  :func:`broadfast.core.keys.backlog_key`, pair id → admission time; entries older than
  ``labeler_max_age_s`` no longer count, the labeler drops those unlabelled anyway). Nothing is
  admitted while the backlog holds ``rate × stream_max_queue_s`` pairs (at least 1), so the
  ``hardcases`` queue stays a few seconds of the teacher's work long.

The pure parts (:class:`TokenBucket`, :func:`budget_rate`, :func:`backlog_limit`) hold no state
and no I/O; :class:`LabelingBudget` keeps its state in Redis, shared by every stream worker.

>>> bucket = TokenBucket(rate=1.0, capacity=2.0, tokens=2.0, last=0.0)
>>> [bucket.take(0.0), bucket.take(0.0), bucket.take(0.0), bucket.take(1.0)]
[True, True, False, True]
>>> s = Settings(stream_budget_per_s=2.0, stream_budget_min_per_s=0.05, stream_budget_max_per_s=20.0, stream_max_queue_s=20.0)
>>> budget_rate(s, None), budget_rate(s, 0.1), budget_rate(s, 500.0), budget_rate(s, 0.0)
(2.0, 0.1, 20.0, 0.05)
>>> backlog_limit(s, 0.1), backlog_limit(s, 0.01), backlog_limit(s, 2.0)
(2, 1, 40)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from broadfast.core.settings import Settings
from broadfast.core.keys import backlog_key, claim_key, labeler_counts_key, stream_key, teacher_rate_key


# -- token bucket -----------------------------------------------------------------------------
def refill(tokens: float, last: float, now: float, rate: float, capacity: float) -> float:
    """Tokens after refilling from ``last`` to ``now`` at ``rate`` per second, capped."""
    return min(capacity, tokens + max(0.0, now - last) * rate)


@dataclass
class TokenBucket:
    """An in-process token bucket (the arithmetic :class:`RedisTokenBucket` and :class:`LabelingBudget` share)."""

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
    """A fixed-rate token bucket shared through Redis: the bucket's state in one Redis hash.

    Updated with an optimistic transaction (WATCH/MULTI), so concurrent workers never
    spend a token twice; the arithmetic is :class:`TokenBucket`'s. (The sampler's budget is
    :class:`LabelingBudget`, the same bucket with a rate that follows the teacher and a backlog bound.)
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


# -- the labeling budget: the teacher's measured rate and the backlog -----------------------
def budget_rate(settings: Settings, measured: float | None) -> float:
    """The bucket's refill rate: the teacher's measured rate (``None``: none reported yet, use the
    starting rate ``stream_budget_per_s``), clamped to [``stream_budget_min_per_s``, ``stream_budget_max_per_s``]."""
    lo, hi = settings.stream.stream_budget_min_per_s, max(settings.stream.stream_budget_min_per_s, settings.stream.stream_budget_max_per_s)
    rate = settings.stream.stream_budget_per_s if measured is None or not math.isfinite(measured) else measured
    return min(hi, max(lo, rate))


def backlog_limit(settings: Settings, rate: float) -> int:
    """Most hard cases admitted and not yet labelled: ``rate × stream_max_queue_s``, at least 1."""
    return max(1, int(math.floor(rate * settings.stream.stream_max_queue_s + 1e-9)))


@dataclass(frozen=True)
class RateReport:
    """One labeler's measured rate, as it is stored in :func:`teacher_rate_key`."""

    worker: str
    rate: float
    ts: float
    expires: float
    teacher_id: str = ""


# One labeler's rate report: set its field, drop the fields that expired (dead labelers), and
# keep the hash alive at least as long as this report. KEYS: rate hash; ARGV: field, JSON, now, ttl (s).
_WRITE_RATE = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local now = tonumber(ARGV[3])
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local ok, rec = pcall(cjson.decode, all[i + 1])
  if (not ok) or type(rec) ~= 'table' or (tonumber(rec['expires']) or 0) < now then
    redis.call('HDEL', KEYS[1], all[i])
  end
end
local ttl = tonumber(ARGV[4])
if redis.call('TTL', KEYS[1]) < ttl then
  redis.call('EXPIRE', KEYS[1], ttl)
end
return 1
"""


def write_teacher_rate(client: Any, settings: Settings, report: RateReport) -> None:
    """Store one labeler's measured rate (its own hash field; several labelers' rates add up)."""
    value = json.dumps({"rate": report.rate, "ts": report.ts, "expires": report.expires, "teacher_id": report.teacher_id})
    ttl = max(1, int(math.ceil(report.expires - report.ts)) + 1)
    client.register_script(_WRITE_RATE)(keys=[teacher_rate_key(settings)], args=[report.worker, value, repr(report.ts), ttl])


def remove_teacher_rate(client: Any, settings: Settings, worker: str) -> None:
    """A labeler that stops takes its rate out at once (a killed one's expires)."""
    client.hdel(teacher_rate_key(settings), worker)


def read_teacher_rates(client: Any, settings: Settings, now: float) -> list[RateReport]:
    """The labelers' reports that have not expired at ``now`` (unreadable ones ignored)."""
    out = []
    for field, value in client.hgetall(teacher_rate_key(settings)).items():
        try:
            rec = json.loads(value)
            report = RateReport(
                worker=field.decode() if isinstance(field, bytes) else str(field),
                rate=float(rec["rate"]),
                ts=float(rec["ts"]),
                expires=float(rec["expires"]),
                teacher_id=str(rec.get("teacher_id", "")),
            )
        except (ValueError, KeyError, TypeError):
            continue
        if report.expires >= now and math.isfinite(report.rate) and report.rate >= 0:
            out.append(report)
    return out


def measured_teacher_rate(client: Any, settings: Settings, now: float) -> float | None:
    """Sum of the live labelers' measured rates (pairs/s); ``None`` when no labeler has reported."""
    reports = read_teacher_rates(client, settings, now)
    return sum(r.rate for r in reports) if reports else None


@dataclass(frozen=True)
class Admission:
    """What one call of :meth:`LabelingBudget.admit` decided."""

    granted: int  # the first ``granted`` pair ids asked for were admitted
    no_room: int  # refused: the backlog was full
    no_token: int  # refused: no token left in the bucket
    rate: float  # the refill rate used (hard cases/s)
    measured: float | None  # the teacher's measured rate (None: the starting rate was used)
    backlog: int  # pairs in the backlog before this admission
    limit: int  # the backlog bound at this rate


class LabelingBudget:
    """The labeling budget shared by every stream worker: a token bucket refilled at the teacher's
    measured rate (the Redis hash ``<prefix>:stream:budget``) and a bound on the backlog
    (:func:`backlog_key`). One optimistic transaction (WATCH/MULTI on both keys) reads the
    bucket and the backlog, takes the tokens and adds the admitted pairs to the backlog, so
    concurrent workers never spend a token twice nor overfill the backlog; the arithmetic is
    :class:`TokenBucket`'s.
    """

    def __init__(self, settings: Settings, client: Any) -> None:
        self.settings, self.client = settings, client
        self.bucket_key = stream_key(settings, "budget")
        self.backlog_key = backlog_key(settings)
        self.capacity = settings.stream.stream_budget_burst

    def rate(self, now: float) -> tuple[float, float | None]:
        """(refill rate, measured teacher rate or None)."""
        measured = measured_teacher_rate(self.client, self.settings, now)
        return budget_rate(self.settings, measured), measured

    def _horizon(self, now: float) -> str:
        """Backlog entries admitted before this (exclusive bound) no longer count: the labeler drops them."""
        return f"({now - self.settings.teacher.labeler_max_age_s!r}"

    def _bucket(self, state: dict[bytes, bytes], rate: float, now: float) -> TokenBucket:
        if state:
            return TokenBucket(rate, self.capacity, float(state[b"tokens"]), float(state[b"last"]))
        return TokenBucket(rate, self.capacity, self.capacity, now)

    def admit(self, now: float, pair_ids: Sequence[str]) -> Admission:
        """Admit as many of ``pair_ids`` (in the order given: hardest first) as tokens and backlog room allow."""
        import redis

        rate, measured = self.rate(now)
        limit = backlog_limit(self.settings, rate)
        while True:
            with self.client.pipeline() as pipe:
                try:
                    pipe.watch(self.bucket_key, self.backlog_key)
                    bucket = self._bucket(pipe.hgetall(self.bucket_key), rate, now)
                    backlog = int(pipe.zcount(self.backlog_key, self._horizon(now), "+inf"))
                    asked = min(len(pair_ids), max(0, limit - backlog))
                    granted = bucket.take_upto(now, asked)  # refills (at this rate) even when nothing is asked
                    pipe.multi()
                    pipe.hset(self.bucket_key, mapping={"tokens": repr(bucket.tokens), "last": repr(bucket.last)})
                    if granted:
                        pipe.zadd(self.backlog_key, {pid: now for pid in pair_ids[:granted]})
                    pipe.zremrangebyscore(self.backlog_key, "-inf", self._horizon(now))
                    pipe.expire(self.backlog_key, int(math.ceil(self.settings.teacher.labeler_max_age_s)) + 1)
                    pipe.execute()
                except redis.WatchError:
                    continue
            return Admission(granted, len(pair_ids) - asked, asked - granted, rate, measured, backlog, limit)

    def tokens(self, now: float) -> float:
        """Tokens in the bucket at ``now`` (refilled at the current rate)."""
        rate, _ = self.rate(now)
        tokens, last = self._state(now)
        return refill(tokens, last, now, rate, self.capacity)

    def _state(self, now: float) -> tuple[float, float]:
        state = self.client.hgetall(self.bucket_key)
        return (float(state[b"tokens"]), float(state[b"last"])) if state else (self.capacity, now)

    def backlog(self, now: float) -> int:
        """Hard cases admitted, not yet labelled, failed or dropped, and younger than ``labeler_max_age_s``."""
        return int(self.client.zcount(self.backlog_key, self._horizon(now), "+inf"))


# A labeler drops stale hard cases: release each one's backlog entry and de-dup claim, unless the
# pair was admitted again after this copy (its backlog time is later than the copy's ts).
# KEYS: backlog, then one claim key per case; ARGV: slack (s), then per case: pair id, ts.
_RELEASE_STALE = """
local slack = tonumber(ARGV[1])
local released = 0
for i = 1, #KEYS - 1 do
  local pid, ts = ARGV[2 * i], tonumber(ARGV[2 * i + 1])
  local admitted = redis.call('ZSCORE', KEYS[1], pid)
  if (not admitted) or tonumber(admitted) <= ts + slack then
    redis.call('ZREM', KEYS[1], pid)
    redis.call('DEL', KEYS[1 + i])
    released = released + 1
  end
end
return released
"""


def release_stale(client: Any, settings: Settings, cases: Sequence[tuple[str, float]]) -> int:
    """Release the backlog entries and claims of dropped (stale) hard cases ``(pair id, ts)``, so
    the pairs may be sampled again when they come back. Returns how many were released."""
    if not cases:
        return 0
    keys = [backlog_key(settings)] + [claim_key(settings, pid) for pid, _ in cases]
    args: list[Any] = [1e-3]
    for pid, ts in cases:
        args += [pid, repr(float(ts))]
    return int(client.register_script(_RELEASE_STALE)(keys=keys, args=args))


def budget_status(client: Any, settings: Settings, now: float | None = None) -> dict[str, Any]:
    """The labeling budget as the demo's live view shows it: the rate in use and where it came
    from, the labelers reporting, the backlog and its bound, and the labelers' counts."""
    now = time.time() if now is None else now
    reports = read_teacher_rates(client, settings, now)
    measured = sum(r.rate for r in reports) if reports else None
    rate = budget_rate(settings, measured)
    budget = LabelingBudget(settings, client)
    tokens, last = budget._state(now)
    counts = {k.decode() if isinstance(k, bytes) else k: int(v) for k, v in client.hgetall(labeler_counts_key(settings)).items()}
    return {
        "rate": rate,
        "rate_source": "measured" if measured is not None else "start",
        "measured_rate": measured,
        "labelers": len(reports),
        "teachers": sorted({r.teacher_id for r in reports}),
        "backlog": budget.backlog(now),
        "backlog_limit": backlog_limit(settings, rate),
        "tokens": refill(tokens, last, now, rate, budget.capacity),
        "labelled": counts.get("labelled", 0),
        "failed": counts.get("failed", 0),
        "dropped_stale": counts.get("dropped_stale", 0),
    }
