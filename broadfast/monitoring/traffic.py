"""Recent traffic from the broker as frames: scored pairs, clicks, teacher labels, hard cases.

:class:`TrafficWindow` keeps the most recent ``monitor_window_events`` events of each
kind in bounded deques, so a long-running monitor holds a rolling window in constant
memory; :meth:`TrafficWindow.frames` turns it into DataFrames:

- ``scored``: the ``Scored`` fields, ``grade_probs`` split into ``p_irrelevant`` /
  ``p_partial`` / ``p_exact``, each ``features`` entry as a ``f_<name>`` column;
- ``clicks``: the ``Click`` fields; ``labels``: ``pair_id`` and ``label`` (the teacher's
  grade, argmax of its aggregated probabilities); ``hardcases``: ``pair_id``.

:func:`read_recent` fills a window once (for ``broadfast drift`` without files): it reads
the tail of each topic without joining a consumer group and skips (and counts) records
that do not validate — the monitor's own consumer group is the one that dead-letters them.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

import numpy as np
import pandas as pd

from broadfast.core.errors import EventValidationError
from broadfast.core.settings import Settings
from broadfast.monitoring.window import PROB_COLUMNS
from broadfast.core.events import Click, Event, HardCase, Scored, TeacherLabel, decode

log = logging.getLogger(__name__)

TOPICS = ("scored", "clicks", "labels", "hardcases")


class TrafficWindow:
    """The most recent events of each monitored kind, bounded, kept as compact rows."""

    def __init__(self, max_events: int) -> None:
        self.scored: deque[tuple] = deque(maxlen=max_events)
        self.clicks: deque[tuple] = deque(maxlen=max_events)
        self.labels: deque[tuple] = deque(maxlen=max_events)
        self.hardcases: deque[tuple] = deque(maxlen=max_events)
        self.skipped = 0

    def add(self, event: Event) -> None:
        if isinstance(event, Scored):
            self.scored.append(tuple(getattr(event, f) for f in SCORED_FIELDS) + (event.grade_probs, event.features or None))
        elif isinstance(event, Click):
            self.clicks.append(tuple(getattr(event, f) for f in CLICK_FIELDS))
        elif isinstance(event, TeacherLabel):
            self.labels.append((event.pair_id, int(np.argmax(event.probs)), event.ts))
        elif isinstance(event, HardCase):
            self.hardcases.append((event.pair_id, event.ts))

    def __len__(self) -> int:
        return len(self.scored)

    def frames(self) -> dict[str, pd.DataFrame]:
        """``scored``, ``clicks``, ``labels`` and ``hardcases`` frames (see the module docstring)."""
        return {
            "scored": scored_frame(self.scored),
            "clicks": pd.DataFrame(list(self.clicks), columns=list(CLICK_FIELDS)),
            "labels": pd.DataFrame(list(self.labels), columns=["pair_id", "label", "ts"]),
            "hardcases": pd.DataFrame(list(self.hardcases), columns=["pair_id", "ts"]),
        }


SCORED_FIELDS = ("request_id", "ts", "query", "ad_id", "title", "position", "score", "model_version", "arm", "experiment_id", "latency_ms", "user_id")
CLICK_FIELDS = ("request_id", "ts", "query", "ad_id", "position", "clicked", "user_id")


def scored_frame(rows: Any) -> pd.DataFrame:
    """Rows kept by :class:`TrafficWindow` as a frame (``p_*`` and ``f_*`` columns spread out)."""
    rows = list(rows)
    n = len(SCORED_FIELDS)
    df = pd.DataFrame([r[:n] for r in rows], columns=list(SCORED_FIELDS))
    probs = np.array([r[n] for r in rows], dtype=float).reshape(-1, 3)
    for i, c in enumerate(PROB_COLUMNS):
        df[c] = probs[:, i]
    names = sorted({k for r in rows if r[n + 1] for k in r[n + 1]})
    for name in names:
        df[f"f_{name}"] = [r[n + 1].get(name, np.nan) if r[n + 1] else np.nan for r in rows]
    return df


def read_recent(settings: Settings, *, max_events: int | None = None, idle_s: float = 2.0, timeout_s: float = 60.0) -> TrafficWindow:
    """The tail (at most ``max_events`` per kind) of the monitored topics, read once."""
    from kafka import TopicPartition

    from broadfast.core.bus import make_consumer

    n = max_events or settings.monitoring.monitor_window_events
    window = TrafficWindow(n)
    consumer = make_consumer(settings, (), None)
    try:
        parts = []
        for short in TOPICS:
            ids = consumer.partitions_for_topic(settings.topic(short)) or set()
            parts += [TopicPartition(settings.topic(short), p) for p in sorted(ids)]
        if not parts:
            return window
        consumer.assign(parts)
        begin, end = consumer.beginning_offsets(parts), consumer.end_offsets(parts)
        per_topic: dict[str, int] = {}
        for tp in parts:
            per_topic[tp.topic] = per_topic.get(tp.topic, 0) + 1
        for tp in parts:
            # The tail of each partition; a topic's share of the cap is split evenly.
            consumer.seek(tp, max(begin[tp], end[tp] - n // per_topic[tp.topic] - 1))
        deadline, last = time.monotonic() + timeout_s, time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - last < idle_s:
            batch = consumer.poll(timeout_ms=300, max_records=5000)
            if batch:
                last = time.monotonic()
            for tp, records in batch.items():
                short = tp.topic[len(settings.kafka.topic_prefix) + 1 :]
                for record in records:
                    try:
                        window.add(decode(short, record.value, max_bytes=settings.kafka.max_event_bytes))
                    except EventValidationError as exc:
                        window.skipped += 1
                        log.debug("skipped invalid record %s[%d]@%d: %s", tp.topic, tp.partition, record.offset, exc)
    finally:
        consumer.close()
    if window.skipped:
        log.warning("skipped %d invalid records while reading recent traffic", window.skipped)
    log.info("read recent traffic: %d scored, %d clicks, %d labels, %d hard cases", len(window.scored), len(window.clicks), len(window.labels), len(window.hardcases))
    return window
