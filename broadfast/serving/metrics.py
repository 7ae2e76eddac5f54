"""Prometheus metrics of the scoring API, on a registry of their own (one per server).

>>> m = ServingMetrics()
>>> m.swaps.inc(); b"broadfast_serving_swaps_total 1.0" in m.render()
True
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 8, 16, 32, 50, 64, 100, 128, 200, 256, 512, 1024, 2048)


class ServingMetrics:
    """Every metric the server exports (names start with ``broadfast_serving_``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram("broadfast_serving_request_latency_seconds", "Scoring request latency (seconds), by arm.", ["arm"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_pairs = Histogram("broadfast_serving_batch_pairs", "Pairs per micro-batch.", buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram("broadfast_serving_batch_requests", "Requests per micro-batch.", buckets=BATCH_BUCKETS, registry=r)
        self.pairs = Counter("broadfast_serving_pairs_scored_total", "Query-ad pairs scored, by model version.", ["version"], registry=r)
        self.requests = Counter("broadfast_serving_requests_total", "Scoring requests answered, by arm.", ["arm"], registry=r)
        self._live_labels: set[tuple[str, str]] = set()
        self.live = Gauge("broadfast_serving_live_version", "1 for each resident version, by role (champion, challenger).", ["role", "version"], registry=r)
        self.swaps = Counter("broadfast_serving_swaps_total", "Champion swaps done.", registry=r)
        self.refusals = Counter("broadfast_serving_swap_refusals_total", "Versions refused, by failed check.", ["stage"], registry=r)
        self.rejected = Counter("broadfast_serving_rejected_requests_total", "Requests refused with a 4xx, by status.", ["status"], registry=r)
        self.errors = Counter("broadfast_serving_errors_total", "Failures while serving, by kind.", ["kind"], registry=r)
        self.scored_sent = Counter("broadfast_serving_scored_events_sent_total", "Scored events handed to the broker.", registry=r)
        self.scored_dropped = Counter("broadfast_serving_scored_events_dropped_total", "Scored events dropped (buffer full or broker unreachable).", registry=r)

    def set_live(self, champion: str | None, challenger: str | None) -> None:
        wanted = {(role, version) for role, version in (("champion", champion), ("challenger", challenger)) if version}
        for labels in self._live_labels - wanted:
            self.live.remove(*labels)
        for labels in wanted:
            self.live.labels(*labels).set(1)
        self._live_labels = wanted

    def render(self) -> bytes:
        return generate_latest(self.registry)
