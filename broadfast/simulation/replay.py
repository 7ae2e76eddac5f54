"""Traffic replay: the simulated search frontend.

A relevance data set's pairs are grouped by query into search requests (a user, the
query, its candidate ads in a seeded "retrieval" order). For each request the frontend

1. logs a :class:`SearchRequest` to ``relevance.requests``;
2. asks the scoring API (``POST {BROADFAST_SCORING_URL}/v1/score``) when one is
   configured and ranks the ads by score; otherwise (or when the call fails) it keeps the
   retrieval order, as a real frontend degrades;
3. shows the top ``slots`` ads and logs a :class:`Click` for each shown ad (``clicked``
   true or false) drawn from the click model below.

Click model — the position-based model (PBM; Chuklin, Markov & de Rijke, *Click Models
for Web Search*, 2015): a user clicks the ad at rank ``r`` (0-based) iff they examine
that rank and find the ad attractive, independently::

    P(click at r) = P(examine r) · P(attractive | grade)
    P(examine r)  = (1 / (r + 1)) ** eta                       for r < slots, else 0
    P(attractive | g) = eps + (alpha_max − eps) · (2**g − 1) / (2**2 − 1)

with the true 3-level grade ``g`` from the data set (0 irrelevant, 1 partial, 2 exact).
Defaults: ``eta = 1.0``, ``eps = 0.1``, ``alpha_max = 0.9``, ``slots = 10`` — so an exact
ad at the top is clicked 90% of the time, an irrelevant one 10%, and rank 4 is examined
one time in five. Each request draws its clicks from a generator seeded by
``(seed, request index)``: the same seed and the same ranking give the same clicks.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from broadfast.core.errors import BroadfastError
from broadfast.core.events import Ad, Click, SearchRequest, now

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClickModel:
    """Position-based click model; see the module docstring."""

    eta: float = 1.0
    eps: float = 0.1
    alpha_max: float = 0.9
    slots: int = 10

    def examination(self, rank: int) -> float:
        return (1.0 / (rank + 1)) ** self.eta if rank < self.slots else 0.0

    def attractiveness(self, grade: int) -> float:
        return self.eps + (self.alpha_max - self.eps) * (2**grade - 1) / 3.0

    def click_probability(self, rank: int, grade: int) -> float:
        return self.examination(rank) * self.attractiveness(grade)

    def draw(self, grades: list[int], rng: np.random.Generator) -> list[bool]:
        """Clicks for ads shown in this order (one uniform draw per shown slot)."""
        shown = grades[: self.slots]
        u = rng.random(len(shown))
        return [bool(u[r] < self.click_probability(r, g)) for r, g in enumerate(shown)]


@dataclass(frozen=True)
class PlannedRequest:
    index: int
    request: SearchRequest
    grades: dict[str, int]


def plan_requests(
    df: pd.DataFrame,
    *,
    limit: int | None,
    seed: int,
    max_ads: int = 50,
    n_users: int = 1000,
    run_id: str | None = None,
) -> Iterator[PlannedRequest]:
    """Search requests from pairs grouped by query, in a seeded order.

    Queries are visited in a shuffled order; once all are used a new pass starts with a
    new shuffle, so ``limit`` may exceed the number of queries. Users follow a Zipf-like
    popularity over ``n_users`` ids.
    """
    if "grade" not in df.columns:
        raise BroadfastError("replay needs a 'grade' column (the click model is driven by the true grade)")
    rng = np.random.default_rng(seed)
    run = run_id or uuid.uuid4().hex[:8]
    groups = [
        (query, rows["ad_id"].to_numpy(), rows["title"].to_numpy(), rows["text"].to_numpy(), rows["grade"].to_numpy(dtype=int))
        for query, rows in df.groupby("query", sort=True)
    ]
    if not groups:
        raise BroadfastError("the data set has no rows")
    user_weights = 1.0 / np.arange(1, n_users + 1)
    user_weights /= user_weights.sum()
    index = 0
    while limit is None or index < limit:
        for qi in rng.permutation(len(groups)):
            if limit is not None and index >= limit:
                return
            query, ids, titles, descs, grades = groups[qi]
            pick = rng.permutation(len(ids))[:max_ads]
            ads = [Ad(ad_id=ids[i], title=titles[i], text=descs[i]) for i in pick]
            user = f"u{int(rng.choice(n_users, p=user_weights)):04d}"
            request = SearchRequest(request_id=f"{run}-{index:07d}", ts=now(), user_id=user, query=query, ads=ads)
            yield PlannedRequest(index, request, {ids[i]: int(grades[i]) for i in pick})
            index += 1


def shifted(
    first: Iterator[PlannedRequest],
    second: Iterator[PlannedRequest],
    *,
    after_s: float | None = None,
    after_requests: int | None = None,
    on_shift: Callable[[float], None] | None = None,
) -> Iterator[PlannedRequest]:
    """A shift of traffic: ``first``'s requests, then ``second``'s once ``after_s`` seconds have passed
    since the first request or ``after_requests`` requests were made (whichever comes first);
    ``on_shift(ts)`` is called once, at the switch. Request ids stay unique (each plan has its own run id).

    >>> df = lambda q: pd.DataFrame({"query": [q], "ad_id": ["a"], "title": ["t"], "text": [""], "grade": [2]})
    >>> plan = shifted(plan_requests(df("old"), limit=None, seed=0), plan_requests(df("new"), limit=None, seed=0), after_requests=2)
    >>> [next(plan).request.query for _ in range(4)]
    ['old', 'old', 'new', 'new']
    """
    if after_s is None and after_requests is None:
        raise BroadfastError("a shift needs after_s or after_requests")
    started = time.monotonic()
    n = 0
    for item in first:
        if (after_s is not None and time.monotonic() - started >= after_s) or (after_requests is not None and n >= after_requests):
            break
        n += 1
        yield item
    if on_shift is not None:
        on_shift(time.time())
    log.info("traffic shifted after %d requests (%.0f s)", n, time.monotonic() - started)
    for i, item in enumerate(second):  # numbered on from the first plan: clicks are drawn by (seed, index)
        yield replace(item, index=n + i)


@dataclass
class ReplayStats:
    requests: int = 0
    ads: int = 0
    impressions: int = 0
    clicks: int = 0
    scored_ok: int = 0
    scoring_failed: int = 0
    elapsed_s: float = 0.0
    events_delivered: int = 0
    events_lost: int = 0  # failed or still unconfirmed when the replay ended
    last_error: str | None = None
    latencies_ms: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def rate(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> str:
        scoring = "off" if self.scored_ok + self.scoring_failed == 0 else f"{self.scored_ok:,} scored, {self.scoring_failed:,} failed"
        lost = f"; {self.events_lost:,} events LOST (not acknowledged by the broker; last error: {self.last_error})" if self.events_lost else ""
        return (
            f"replayed {self.requests:,} requests ({self.ads:,} ads, {self.impressions:,} impressions, "
            f"{self.clicks:,} clicks) in {self.elapsed_s:.1f} s: {self.rate:,.1f} req/s; scoring {scoring}; "
            f"{self.events_delivered:,} events delivered{lost}"
        )


Scorer = Callable[[SearchRequest], list[float]]


class HttpScorer:
    """Calls the scoring API; returns one score per ad in input order."""

    def __init__(self, base_url: str, timeout_s: float = 5.0) -> None:
        import httpx

        self.url = base_url.rstrip("/") + "/v1/score"
        self.client = httpx.Client(timeout=timeout_s)

    def __call__(self, request: SearchRequest) -> list[float]:
        body = {
            "request_id": request.request_id,
            "user_id": request.user_id,
            "query": request.query,
            "ads": [{"ad_id": a.ad_id, "title": a.title, "text": a.text} for a in request.ads],
        }
        response = self.client.post(self.url, json=body)
        response.raise_for_status()
        results = response.json()["results"]
        by_id = {r["ad_id"]: float(r["score"]) for r in results}
        return [by_id[a.ad_id] for a in request.ads]

    def close(self) -> None:
        self.client.close()


class Replayer:
    """Plays planned requests through the bus (and the scorer, if any) at a given rate."""

    def __init__(self, bus: Any, *, scorer: Scorer | None = None, click_model: ClickModel | None = None, seed: int = 0) -> None:
        self.bus = bus
        self.scorer = scorer
        self.click_model = click_model or ClickModel()
        self.seed = seed

    def handle(self, planned: PlannedRequest, stats: ReplayStats) -> None:
        request = planned.request
        self.bus.publish(request)
        order = list(range(len(request.ads)))
        if self.scorer is not None:
            t0 = time.perf_counter()
            try:
                scores = self.scorer(request)
                order.sort(key=lambda i: -scores[i])  # stable: ties keep retrieval order
                ok = True
            except Exception as exc:  # noqa: BLE001 - the frontend degrades, it does not stop
                log.warning("scoring request %s failed: %s", request.request_id, exc)
                ok = False
            latency = (time.perf_counter() - t0) * 1000
        ranked = [request.ads[i] for i in order]
        rng = np.random.default_rng([self.seed, planned.index])
        clicks = self.click_model.draw([planned.grades[a.ad_id] for a in ranked], rng)
        ts = now()
        for rank, (ad, clicked) in enumerate(zip(ranked, clicks)):
            self.bus.publish(Click(request_id=request.request_id, ts=ts, query=request.query, ad_id=ad.ad_id, position=rank, clicked=clicked, user_id=request.user_id))
        with stats.lock:
            stats.requests += 1
            stats.ads += len(request.ads)
            stats.impressions += len(clicks)
            stats.clicks += sum(clicks)
            if self.scorer is not None:
                stats.latencies_ms.append(latency)
                if ok:
                    stats.scored_ok += 1
                else:
                    stats.scoring_failed += 1

    def run(
        self,
        planned: Iterator[PlannedRequest],
        *,
        rate: float | None = None,
        concurrency: int = 1,
        progress: Any | None = None,
        stop: threading.Event | None = None,
        flush_timeout_s: float = 30.0,
    ) -> ReplayStats:
        """Replay at ``rate`` requests/s (None or 0: as fast as possible). At the end, waits up to
        ``flush_timeout_s`` for the broker to acknowledge every event; the stats count those it did not."""
        stats = ReplayStats()
        start = time.perf_counter()
        interval = 1.0 / rate if rate else 0.0
        pool = ThreadPoolExecutor(max_workers=concurrency) if concurrency > 1 else None
        inflight: list[Any] = []
        try:
            for n, item in enumerate(planned):
                if stop is not None and stop.is_set():
                    break
                if interval:
                    delay = start + n * interval - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                if pool is None:
                    self.handle(item, stats)
                else:
                    inflight.append(pool.submit(self.handle, item, stats))
                    if len(inflight) >= 4 * concurrency:
                        inflight.pop(0).result()
                if progress is not None:
                    progress(1)
            for fut in inflight:
                fut.result()
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
            self.bus.flush(timeout=flush_timeout_s)
            stats.elapsed_s = time.perf_counter() - start
            stats.events_delivered = self.bus.delivered
            stats.events_lost = self.bus.undelivered + self.bus.pending
            stats.last_error = self.bus.last_error or ("unconfirmed when the replay ended" if stats.events_lost else None)
        return stats
