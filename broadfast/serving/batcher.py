"""Dynamic micro-batching: pairs of concurrent requests scored together in one worker thread.

A request hands its (query, ad text) pairs and the model it was routed to to
:meth:`MicroBatcher.submit` and gets a future. The worker takes the first waiting
request, gathers more for at most ``max_wait_ms`` (or until ``max_batch_pairs``), groups
them by model, and scores each group with the model's backend (:meth:`LiveModel.predict_proba`:
PyTorch, or int8 by OpenVINO or ONNX Runtime, see :mod:`broadfast.serving.backends`), which tokenises once and sorts
the pairs by length (length buckets of ``forward_batch`` pairs, so little padding).
Each request keeps the model object it was routed with, so a swap never changes the
model of a request already in flight.

>>> params = BatchParams(batching=True, max_batch_pairs=256, max_wait_s=0.002, forward_batch=64)
>>> params.max_batch_pairs
256
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from broadfast.core.settings import ServingSettings
from broadfast.serving.metrics import ServingMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchParams:
    """The one set of parameters of batched scoring (from settings)."""

    batching: bool = True
    max_batch_pairs: int = 256
    max_wait_s: float = 0.002
    forward_batch: int = 64

    @classmethod
    def from_settings(cls, serving: ServingSettings) -> BatchParams:
        return cls(serving.serve_batching, serving.serve_max_batch_pairs, serving.serve_max_wait_ms / 1000.0, serving.serve_forward_batch)


@dataclass(eq=False)
class _Job:
    model: Any  # broadfast.serving.models.LiveModel
    queries: list[str]
    texts: list[str]
    future: Future


class MicroBatcher:
    """One worker thread that scores queued requests in micro-batches."""

    def __init__(self, params: BatchParams, metrics: ServingMetrics) -> None:
        self.params = params
        self.metrics = metrics
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._carry: _Job | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="micro-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        while True:  # nothing left waiting forever
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            job.future.set_exception(RuntimeError("the server is stopping"))

    def submit(self, model: Any, queries: list[str], texts: list[str]) -> Future:
        """Queue pairs for ``model``; the future's result is an (n, 3) array of grade probabilities."""
        future: Future = Future()
        self._queue.put(_Job(model, queries, texts, future))
        return future

    # -- worker ----------------------------------------------------------------------------------
    def _next(self, timeout: float) -> _Job | None:
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _gather(self, first: _Job) -> list[_Job]:
        jobs, pairs = [first], len(first.queries)
        if not self.params.batching:
            return jobs
        deadline = time.monotonic() + self.params.max_wait_s
        while pairs < self.params.max_batch_pairs:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if pairs + len(job.queries) > self.params.max_batch_pairs:
                self._carry = job  # a request is never split: it starts the next batch
                break
            jobs.append(job)
            pairs += len(job.queries)
        return jobs

    def _run(self) -> None:
        while not self._stop.is_set():
            first = self._next(timeout=0.2)
            if first is None:
                continue
            jobs = self._gather(first)
            self.metrics.batch_requests.observe(len(jobs))
            self.metrics.batch_pairs.observe(sum(len(j.queries) for j in jobs))
            groups: dict[int, list[_Job]] = {}
            for job in jobs:
                groups.setdefault(id(job.model), []).append(job)
            for group in groups.values():
                self._score(group)

    def _score(self, jobs: list[_Job]) -> None:
        """Score one model's jobs in one forward pass. When the pass fails, each job is scored
        alone, so only the request that caused the failure gets it; a request whose own scores
        are not finite fails alone too."""
        model = jobs[0].model
        queries = [q for j in jobs for q in j.queries]
        texts = [t for j in jobs for t in j.texts]
        try:
            probs = model.predict_proba(queries, texts, batch_size=self.params.forward_batch)
        except Exception as exc:
            if len(jobs) > 1:
                log.warning("scoring a batch of %d requests (%d pairs) with %s failed (%s: %s); scoring each request alone", len(jobs), len(queries), model.version, type(exc).__name__, exc)
                self.metrics.errors.labels("batch_retried").inc()
                for job in jobs:
                    self._score([job])
                return
            log.exception("scoring a request of %d pairs with %s failed", len(queries), model.version)
            self.metrics.errors.labels("forward").inc()
            jobs[0].future.set_exception(exc)
            return
        start = 0
        for job in jobs:
            n = len(job.queries)
            part = probs[start : start + n]
            start += n
            if not np.isfinite(part).all():
                log.error("model %s produced non-finite probabilities for a request of %d pairs", model.version, n)
                self.metrics.errors.labels("forward").inc()
                job.future.set_exception(FloatingPointError(f"model {model.version} produced non-finite probabilities"))
                continue
            self.metrics.pairs.labels(model.version).inc(n)
            job.future.set_result(part)
