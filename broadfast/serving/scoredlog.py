"""Scored logging: every scored pair to ``relevance.scored`` without slowing scoring down.

Requests hand one record each to a bounded in-memory buffer; a background thread turns a
record into one :class:`~broadfast.core.events.Scored` event per pair and publishes them through
the :class:`~broadfast.core.bus.EventBus`. When the broker cannot be reached the buffer fills,
further records are dropped, and the dropped events are counted (metric
``broadfast_serving_scored_events_dropped_total``) and logged — scoring never waits on Kafka.

:class:`BusLink` is the lazily (re)connected bus this module and the alerts share.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from broadfast.core.settings import Settings
from broadfast.serving.metrics import ServingMetrics
from broadfast.core.events import Event, Scored

log = logging.getLogger(__name__)

RECONNECT_S = 5.0
DROP_LOG_EVERY_S = 10.0


class BusLink:
    """An :class:`EventBus` made on first use and re-tried every few seconds while the broker is away."""

    def __init__(self, settings: Settings, max_block_ms: int = 3000) -> None:
        self.settings = settings
        self.max_block_ms = max_block_ms
        self._bus: Any | None = None
        self._next_try = 0.0
        self._lock = threading.Lock()

    def get(self) -> Any | None:
        """The bus, or None when the broker is unreachable (tried again after ``RECONNECT_S``)."""
        with self._lock:
            if self._bus is not None or time.monotonic() < self._next_try:
                return self._bus
            from broadfast.core.bus import EventBus, make_producer

            try:
                producer = make_producer(self.settings, max_block_ms=self.max_block_ms, bootstrap_timeout_ms=self.max_block_ms)
                self._bus = EventBus(self.settings, producer=producer)
                log.info("connected to the broker at %s", self.settings.kafka.kafka_bootstrap)
            except Exception as exc:  # noqa: BLE001 - kafka-python raises several types for "no broker"
                self._next_try = time.monotonic() + RECONNECT_S
                log.warning("broker at %s unreachable (%s); retrying in %.0f s", self.settings.kafka.kafka_bootstrap, exc, RECONNECT_S)
            return self._bus

    @property
    def connected(self) -> bool:
        return self._bus is not None

    def publish(self, event: Event, what: str) -> bool:
        """Publish one event; False (and a log line) when it could not be handed to the broker."""
        bus = self.get()
        if bus is None:
            log.error("could not send %s (broker unreachable): %s", what, event.model_dump_json()[:500])
            return False
        try:
            bus.publish(event)
            return True
        except Exception:
            log.exception("could not send %s", what)
            return False

    def close(self) -> None:
        with self._lock:
            if self._bus is not None:
                try:
                    self._bus.close(timeout=5)
                except Exception:
                    log.warning("closing the producer failed", exc_info=True)
                self._bus = None


@dataclass
class ScoredRecord:
    """What one answered request leaves for the log (expanded into events off the request path)."""

    request_id: str
    user_id: str | None
    query: str
    ads: list[tuple[str, str, str]]  # (ad_id, title, description as the student read it)
    probs: np.ndarray  # (n, 3)
    scores: list[float]
    model_version: str
    arm: str
    experiment_id: str | None
    latency_ms: float
    ts: float
    features: list[dict[str, float]] | None = field(default=None)

    def events(self) -> list[Scored]:
        out = []
        for i, (ad_id, title, text) in enumerate(self.ads):
            p = self.probs[i]
            out.append(
                Scored(
                    request_id=self.request_id, ts=self.ts, query=self.query, ad_id=ad_id, title=title, text=text, position=i,
                    score=min(max(self.scores[i], 0.0), 1.0), grade_probs=(float(p[0]), float(p[1]), float(p[2])),
                    model_version=self.model_version, arm=self.arm, experiment_id=self.experiment_id,  # type: ignore[arg-type]
                    latency_ms=self.latency_ms, user_id=self.user_id, features=self.features[i] if self.features else {},
                )
            )
        return out


class ScoredLog:
    """The bounded buffer and its publishing thread."""

    def __init__(self, settings: Settings, link: BusLink, metrics: ServingMetrics) -> None:
        self.link = link
        self.metrics = metrics
        self.buffer: queue.Queue[ScoredRecord] = queue.Queue(maxsize=settings.serving.serve_scored_buffer)
        self.dropped = 0
        self._last_drop_log = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scored-log", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def offer(self, record: ScoredRecord) -> None:
        """Queue a record; when the buffer is full its events are dropped and counted."""
        try:
            self.buffer.put_nowait(record)
        except queue.Full:
            self._drop(len(record.ads), "buffer full: the broker is slow or unreachable")

    def _drop(self, n: int, why: str) -> None:
        self.metrics.scored_dropped.inc(n)
        with self._lock:
            self.dropped += n
            total = self.dropped
            now = time.monotonic()
            if now - self._last_drop_log < DROP_LOG_EVERY_S:
                return
            self._last_drop_log = now
        log.warning("scored log: dropped %d events (%d so far): %s", n, total, why)

    def _run(self) -> None:
        while not self._stop.is_set():
            bus = self.link.get()
            if bus is None:
                self._stop.wait(0.5)  # records wait in the buffer (and overflow) until the broker is back
                continue
            try:
                record = self.buffer.get(timeout=0.2)
            except queue.Empty:
                continue
            self._publish(bus, record)

    def _publish(self, bus: Any, record: ScoredRecord) -> None:
        try:
            events = record.events()
        except Exception as exc:  # noqa: BLE001 - a bad record must not stop the log
            self.metrics.errors.labels("scored_event").inc()
            self._drop(len(record.ads), f"could not build events: {exc}")
            return
        for event in events:
            try:
                future = bus.publish(event)
            except Exception as exc:  # noqa: BLE001 - KafkaTimeoutError and friends
                self._drop(1, f"publish failed: {exc}")
                continue
            future.add_callback(lambda _meta: self.metrics.scored_sent.inc())
            future.add_errback(lambda exc: self._drop(1, f"broker refused or timed out: {exc}"))

    def stop(self, drain_s: float = 5.0) -> None:
        """Publish what is buffered (for at most ``drain_s`` seconds), then stop the thread."""
        deadline = time.monotonic() + drain_s
        while not self.buffer.empty() and time.monotonic() < deadline and self.link.connected:
            time.sleep(0.05)
        self._stop.set()
        self._thread.join(timeout=drain_s)
        left = self.buffer.qsize()
        if left:
            n = 0
            while True:
                try:
                    n += len(self.buffer.get_nowait().ads)
                except queue.Empty:
                    break
            self._drop(n, "server stopping with the broker unreachable")
