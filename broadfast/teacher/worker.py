"""The teacher labeling worker: ``relevance.hardcases`` → teacher → ``relevance.labels``.

For each batch of hard cases: skip the pairs this teacher already labelled (a Redis hash,
:func:`labelled_key`), deduplicate the batch by pair id, ask the teacher, embed each rationale
(packaged MiniLM), publish one :class:`~broadfast.core.events.TeacherLabel` per pair, flush the
producer, record the pairs as labelled, and only then commit the consumer offsets. A crash
anywhere before the commit means the batch is read again (at-least-once); the labelled hash
makes a re-read cheap and keeps one label per pair and teacher. A pair the teacher cannot
label (no rationale, unreadable grade, time-out) goes to the dead-letter topic with the
reason; a teacher that cannot be reached at all stops the worker without committing.

Two Redis records say "pairs labelled", both written after the labels are flushed: this
teacher's hash :func:`labelled_key` (field pair_id → label time; the worker's idempotence) and
the teacher-agnostic set :func:`broadfast.core.keys.labelled_pairs_key` (``<prefix>:labelled_pairs``,
defined by the hard-case sampler, whose novelty check reads it):

>>> from broadfast.core.settings import Settings
>>> labelled_key(Settings(topic_prefix="relevance"), "oracle:human-grades(dev.parquet)")
'relevance:labelled:oracle:human-grades(dev.parquet)'

**Too old is dropped.** A hard case whose age (now − its ``ts``, the time the sampler admitted
it) exceeds ``labeler_max_age_s`` is not labelled: by the time its label was trained on and
served it would be stale, and the teacher's time is better spent on a fresh one. It is counted
(``stats.dropped_stale``, the ``dropped_stale`` field of :func:`broadfast.core.keys.labeler_counts_key`,
the summary log line) — not dead-lettered, it is not malformed — and its backlog entry and
de-dup claim are released (:func:`broadfast.core.budget.release_stale`), so the sampler may send the
pair again when it is scored again.

**The measured rate.** After each batch the teacher answered, the worker measures the pairs
the teacher answered (labelled or failed) per second of busy wall time — from the batch's
start to its labels recorded, the wait for the teacher included, the idle polls of an empty
queue not (counting idle time would make a throttled queue look like a slow teacher, and the
budget would shrink without end) — over the batches of the last ``labeler_rate_window_s``
(:class:`RateMeter`), and writes it to its own field of :func:`broadfast.core.keys.teacher_rate_key`
(:func:`broadfast.core.budget.write_teacher_rate`). The report counts for ``labeler_rate_ttl_s`` (at
least three times the longest recent batch); the worker renews it while idle and before each
teacher call, and removes it when it closes, so a dead labeler's rate expires and several
labelers' rates add up. The hard-case sampler admits at that rate. Every pair leaving the queue
(labelled, failed, skipped as labelled already, dropped) leaves the sampler's backlog
(:func:`broadfast.core.keys.backlog_key`).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from broadfast.core import connections
from broadfast.core.settings import Settings
from broadfast.core.bus import EventBus, commit, consume, make_consumer
from broadfast.core.deadletter import DeadLetters
from broadfast.core.events import HardCase, encode
from broadfast.core.budget import RateReport, release_stale, remove_teacher_rate, write_teacher_rate
from broadfast.core.keys import backlog_key, labeler_counts_key, labelled_key, labelled_pairs_key

log = logging.getLogger(__name__)

CONSUMER_NAME = "labeler"


def already_labelled(redis_client: Any, settings: Settings, teacher_id: str, pair_ids: list[str]) -> set[str]:
    """The subset of ``pair_ids`` this teacher has labelled."""
    if not pair_ids:
        return set()
    seen = redis_client.hmget(labelled_key(settings, teacher_id), pair_ids)
    return {p for p, s in zip(pair_ids, seen) if s is not None}


class RateMeter:
    """Pairs answered per busy second over the batches that ended in the last ``window_s``
    seconds (the last batch always counts, however old).

    >>> m = RateMeter(window_s=60.0)
    >>> m.rate() is None
    True
    >>> m.add(end=10.0, busy_s=10.0, pairs=2)
    >>> m.add(end=30.0, busy_s=10.0, pairs=6)
    >>> m.rate()
    0.4
    >>> m.add(end=100.0, busy_s=5.0, pairs=5)  # the first two ended more than 60 s before it
    >>> m.rate()
    1.0
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.batches: deque[tuple[float, float, int]] = deque()  # (end, busy seconds, pairs)

    def add(self, end: float, busy_s: float, pairs: int) -> None:
        self.batches.append((end, max(busy_s, 1e-6), pairs))
        while len(self.batches) > 1 and self.batches[0][0] < end - self.window_s:
            self.batches.popleft()

    def rate(self) -> float | None:
        if not self.batches:
            return None
        return sum(b[2] for b in self.batches) / sum(b[1] for b in self.batches)

    @property
    def longest_busy_s(self) -> float:
        """The longest batch in the window (the report must outlive the next one like it)."""
        return max((b[1] for b in self.batches), default=0.0)


@dataclass
class LabelerStats:
    consumed: int = 0
    labelled: int = 0
    skipped: int = 0
    failed: int = 0
    dropped_stale: int = 0  # hard cases older than labeler_max_age_s, dropped unlabelled
    batches: int = 0
    seconds_teacher: float = 0.0
    seconds_busy: float = 0.0  # wall time of the batches the teacher answered, the teacher's wait included
    rate: float | None = None  # the measured rate last reported (pairs/s)
    extra: dict[str, Any] = field(default_factory=dict)


class Labeler:
    """One labeling worker: a consumer group member that turns hard cases into labels."""

    def __init__(
        self,
        settings: Settings,
        teacher: Any,
        *,
        bus: EventBus | None = None,
        embedder: Any | None = None,
        redis_client: Any | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.teacher = teacher
        self.teacher_id = teacher.teacher_id
        self.bus = bus or EventBus(settings)
        self.deadletters = DeadLetters(settings, self.bus, CONSUMER_NAME)
        self.redis = redis_client or connections.redis_client(settings)
        self.embedder = embedder
        self.clock = clock
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.meter = RateMeter(settings.teacher.labeler_rate_window_s)
        self._reported_at: float | None = None
        self.stats = LabelerStats()

    # -- the measured rate ------------------------------------------------------------------
    def report_rate(self) -> float | None:
        """Write (or renew) this worker's measured rate in Redis; nothing before a first measurement."""
        rate = self.meter.rate()
        if rate is None:
            return None
        now = self.clock()
        ttl = max(self.settings.teacher.labeler_rate_ttl_s, 3.0 * self.meter.longest_busy_s)
        write_teacher_rate(self.redis, self.settings, RateReport(self.worker_id, rate, now, now + ttl, self.teacher_id))
        self._reported_at = now
        self.stats.rate = rate
        return rate

    def _renew_rate(self) -> None:
        """Keep the report alive while idle (at most every quarter TTL)."""
        if self._reported_at is None or self.clock() - self._reported_at >= self.settings.teacher.labeler_rate_ttl_s / 4:
            self.report_rate()

    def process(self, deliveries: list[Any]) -> None:
        """Label one batch of deliveries; publishes, flushes and records them (does not commit)."""
        from broadfast.teacher.labels import (
            embed_rationales,
            pair_from_hardcase,
            to_event,
        )
        from broadfast.teacher.mpcot import Label

        start = self.clock()
        self.stats.consumed += len(deliveries)
        self.stats.batches += 1
        cases: dict[str, tuple[HardCase, Any]] = {}
        for d in deliveries:
            if d.event.pair_id not in cases:  # same pair twice in a batch: label it once
                cases[d.event.pair_id] = (d.event, d)
        done = already_labelled(self.redis, self.settings, self.teacher_id, list(cases))
        fresh = [(hc, d) for pid, (hc, d) in cases.items() if pid not in done]
        self.stats.skipped += len(deliveries) - len(fresh)
        if done:  # labelled already: out of the sampler's backlog
            self.redis.zrem(backlog_key(self.settings), *done)
        max_age = self.settings.teacher.labeler_max_age_s
        stale = [hc for hc, _ in fresh if start - hc.ts > max_age]
        todo = [(hc, d) for hc, d in fresh if start - hc.ts <= max_age]
        if stale:
            self.drop_stale(stale)
        if not todo:
            self.bus.flush()  # dead letters of invalid records in this poll, before the commit
            return
        self._renew_rate()  # a long teacher call must not let the last report expire
        t0 = time.perf_counter()
        results = self.teacher.label([pair_from_hardcase(hc) for hc, _ in todo])
        self.stats.seconds_teacher += time.perf_counter() - t0
        ok = [(r, hc) for r, (hc, _) in zip(results, todo) if isinstance(r, Label)]
        for r, (hc, d) in zip(results, todo):
            if not isinstance(r, Label):
                self.deadletters.send(d.topic, d.partition, d.offset, f"teacher {self.teacher_id} could not label pair {hc.pair_id}: {r.reason}", encode(hc))
                self.stats.failed += 1
        embeddings = embed_rationales([r for r, _ in ok], self.embedder)
        for (r, hc), emb in zip(ok, embeddings):
            self.bus.publish(to_event(r, emb, first_scored_ts=hc.first_scored_ts))
        self.bus.flush()  # the labels are written before they count as done
        pipe = self.redis.pipeline(transaction=True)
        if ok:
            stamp = str(time.time())
            ids = [r.pair.pair_id for r, _ in ok]
            pipe.hset(labelled_key(self.settings, self.teacher_id), mapping=dict.fromkeys(ids, stamp))
            pipe.sadd(labelled_pairs_key(self.settings), *ids)  # what the hard-case sampler's novelty check reads
            pipe.hincrby(labeler_counts_key(self.settings), "labelled", len(ok))
        failed = len(todo) - len(ok)
        if failed:
            pipe.hincrby(labeler_counts_key(self.settings), "failed", failed)
        pipe.zrem(backlog_key(self.settings), *[hc.pair_id for hc, _ in todo])  # answered: out of the backlog
        pipe.execute()
        self.stats.labelled += len(ok)
        end = self.clock()
        self.stats.seconds_busy += end - start
        self.meter.add(end, end - start, len(todo))
        self.report_rate()

    def drop_stale(self, cases: list[HardCase]) -> None:
        """Drop hard cases that waited too long: count them and release their backlog entry and claim."""
        release_stale(self.redis, self.settings, [(hc.pair_id, hc.ts) for hc in cases])
        self.redis.hincrby(labeler_counts_key(self.settings), "dropped_stale", len(cases))
        self.stats.dropped_stale += len(cases)
        log.debug("labeler %s: dropped %d hard case(s) older than %.0f s", self.teacher_id, len(cases), self.settings.teacher.labeler_max_age_s)

    def call_size(self) -> int:
        """Hard cases per teacher call: what the teacher labels in a quarter of ``labeler_max_age_s``
        at its measured rate (one until the rate is measured), at most ``labeler_batch``. A slow
        teacher (a CPU LLM, ~0.1 pairs/s) then publishes each label seconds after it is made instead
        of holding it until a batch of 16 is done, minutes later, and the cases behind it are
        judged stale at the time their own call starts."""
        rate = self.meter.rate()
        if rate is None:
            return 1
        return max(1, min(self.settings.teacher.labeler_batch, int(rate * self.settings.teacher.labeler_max_age_s / 4)))

    def run(
        self,
        *,
        idle_polls: int | None = None,
        max_batches: int | None = None,
        max_records: int | None = None,
        on_batch: Callable[[LabelerStats], None] | None = None,
    ) -> LabelerStats:
        """Consume until stopped (or ``idle_polls`` empty polls in a row, ``max_batches`` batches,
        or ``max_records`` hard cases consumed)."""
        consumer = make_consumer(self.settings, ["hardcases"], self.settings.teacher.labeler_group, max_poll_records=self.settings.teacher.labeler_batch)
        pending: list[Any] = []
        try:
            for delivery in consume(self.settings, consumer, self.deadletters, max_records=self.settings.teacher.labeler_batch, idle_polls=idle_polls):
                if delivery is not None:
                    pending.append(delivery)
                enough = max_records is not None and self.stats.consumed + len(pending) >= max_records
                if pending and (delivery is None or enough or len(pending) >= self.settings.teacher.labeler_batch):
                    limit = self.call_size()
                    for k in range(0, len(pending), limit):  # each call's labels go out as soon as it returns
                        self.process(pending[k : k + limit])
                    commit(consumer)  # only after the labels were flushed: at-least-once (a refused commit: re-read, skipped as labelled)
                    pending = []
                    if on_batch is not None:
                        on_batch(self.stats)
                    if (max_batches is not None and self.stats.batches >= max_batches) or enough:
                        break
                elif delivery is None:
                    self.bus.flush()  # dead letters of records that did not validate are written first
                    commit(consumer)  # then their offsets move on
                if delivery is None:
                    self._renew_rate()  # idle: the teacher's rate still holds
        finally:
            consumer.close(autocommit=False)
        rate = self.stats.rate
        log.info(
            "labeler %s: %d consumed, %d labelled, %d skipped (already labelled), %d failed, %d dropped as stale (older than %.0f s); measured rate %s",
            self.teacher_id, self.stats.consumed, self.stats.labelled, self.stats.skipped, self.stats.failed,
            self.stats.dropped_stale, self.settings.teacher.labeler_max_age_s, f"{rate:.3g} pairs/s" if rate is not None else "— (nothing labelled)",
        )
        return self.stats

    def close(self) -> None:
        try:
            remove_teacher_rate(self.redis, self.settings, self.worker_id)  # a stopped labeler labels nothing
        except Exception:  # noqa: BLE001 - Redis gone: the report expires by itself
            log.debug("could not remove the rate report of %s", self.worker_id, exc_info=True)
        self.bus.close()
        self.redis.close()
