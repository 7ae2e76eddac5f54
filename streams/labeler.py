"""The teacher labeling worker: ``relevance.hardcases`` → teacher → ``relevance.labels``.

For each batch of hard cases: skip the pairs this teacher already labelled (a Redis hash,
:func:`labelled_key`), deduplicate the batch by pair id, ask the teacher, embed each rationale
(packaged MiniLM), publish one :class:`~streams.events.TeacherLabel` per pair, flush the
producer, record the pairs as labelled, and only then commit the consumer offsets. A crash
anywhere before the commit means the batch is read again (at-least-once); the labelled hash
makes a re-read cheap and keeps one label per pair and teacher. A pair the teacher cannot
label (no rationale, unreadable grade, time-out) goes to the dead-letter topic with the
reason; a teacher that cannot be reached at all stops the worker without committing.

Two Redis records say "pairs labelled", both written after the labels are flushed: this
teacher's hash :func:`labelled_key` (field pair_id → label time; the worker's idempotence) and
the teacher-agnostic set :func:`streams.sampler.labelled_pairs_key` (``<prefix>:labelled_pairs``,
defined by the hard-case sampler, whose novelty check reads it):

>>> from broadfast.settings import Settings
>>> labelled_key(Settings(topic_prefix="relevance"), "oracle:human-grades(dev.parquet)")
'relevance:labelled:oracle:human-grades(dev.parquet)'
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from broadfast.settings import Settings
from streams.bus import EventBus, consume, make_consumer
from streams.deadletter import DeadLetters
from streams.events import HardCase, encode
from streams.sampler import labelled_pairs_key

log = logging.getLogger(__name__)

CONSUMER_NAME = "labeler"


def labelled_key(settings: Settings, teacher_id: str) -> str:
    """Redis hash of the pairs ``teacher_id`` has labelled: field pair_id → label time (epoch s)."""
    return f"{settings.topic_prefix}:labelled:{teacher_id}"


def already_labelled(redis_client: Any, settings: Settings, teacher_id: str, pair_ids: list[str]) -> set[str]:
    """The subset of ``pair_ids`` this teacher has labelled."""
    if not pair_ids:
        return set()
    seen = redis_client.hmget(labelled_key(settings, teacher_id), pair_ids)
    return {p for p, s in zip(pair_ids, seen) if s is not None}


@dataclass
class LabelerStats:
    consumed: int = 0
    labelled: int = 0
    skipped: int = 0
    failed: int = 0
    batches: int = 0
    seconds_teacher: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class Labeler:
    """One labeling worker: a consumer group member that turns hard cases into labels."""

    def __init__(self, settings: Settings, teacher: Any, *, bus: EventBus | None = None, embedder: Any | None = None, redis_client: Any | None = None) -> None:
        import redis

        self.settings = settings
        self.teacher = teacher
        self.teacher_id = teacher.teacher_id
        self.bus = bus or EventBus(settings)
        self.deadletters = DeadLetters(settings, self.bus, CONSUMER_NAME)
        self.redis = redis_client or redis.Redis.from_url(settings.redis_url)
        self.embedder = embedder
        self.stats = LabelerStats()

    def process(self, deliveries: list[Any]) -> None:
        """Label one batch of deliveries; publishes, flushes and records them (does not commit)."""
        from training.teacher.labels import (
            embed_rationales,
            pair_from_hardcase,
            to_event,
        )
        from training.teacher.mpcot import Label

        self.stats.consumed += len(deliveries)
        self.stats.batches += 1
        cases: dict[str, tuple[HardCase, Any]] = {}
        for d in deliveries:
            if d.event.pair_id not in cases:  # same pair twice in a batch: label it once
                cases[d.event.pair_id] = (d.event, d)
        done = already_labelled(self.redis, self.settings, self.teacher_id, list(cases))
        todo = [(hc, d) for pid, (hc, d) in cases.items() if pid not in done]
        self.stats.skipped += len(deliveries) - len(todo)
        if not todo:
            self.bus.flush()  # dead letters of invalid records in this poll, before the commit
            return
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
        if ok:
            stamp = str(time.time())
            ids = [r.pair.pair_id for r, _ in ok]
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(labelled_key(self.settings, self.teacher_id), mapping=dict.fromkeys(ids, stamp))
            pipe.sadd(labelled_pairs_key(self.settings), *ids)  # what the hard-case sampler's novelty check reads
            pipe.execute()
        self.stats.labelled += len(ok)

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
        consumer = make_consumer(self.settings, ["hardcases"], self.settings.labeler_group, max_poll_records=self.settings.labeler_batch)
        pending: list[Any] = []
        try:
            for delivery in consume(self.settings, consumer, self.deadletters, max_records=self.settings.labeler_batch, idle_polls=idle_polls):
                if delivery is not None:
                    pending.append(delivery)
                enough = max_records is not None and self.stats.consumed + len(pending) >= max_records
                if pending and (delivery is None or enough or len(pending) >= self.settings.labeler_batch):
                    self.process(pending)
                    consumer.commit()  # only after the labels were flushed: at-least-once
                    pending = []
                    if on_batch is not None:
                        on_batch(self.stats)
                    if (max_batches is not None and self.stats.batches >= max_batches) or enough:
                        break
                elif delivery is None:
                    self.bus.flush()  # dead letters of records that did not validate are written first
                    consumer.commit()  # then their offsets move on
        finally:
            consumer.close(autocommit=False)
        log.info(
            "labeler %s: %d consumed, %d labelled, %d skipped (already labelled), %d failed",
            self.teacher_id, self.stats.consumed, self.stats.labelled, self.stats.skipped, self.stats.failed,
        )
        return self.stats

    def close(self) -> None:
        self.bus.close()
        self.redis.close()
