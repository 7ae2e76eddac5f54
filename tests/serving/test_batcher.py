"""Micro-batching: concurrent requests share forward passes, never get split, and keep their own model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from broadfast.serving.batcher import BatchParams, MicroBatcher
from broadfast.serving.metrics import ServingMetrics
from broadfast.serving.models import LiveModel
from tests.serving.conftest import metric, variant
from broadfast.model.student import load_student


def jobs_of(n: int, size: int) -> list[tuple[list[str], list[str]]]:
    return [([f"query {i}"] * size, [f"ad {i} {k} " + "word " * (k % 7) for k in range(size)]) for i in range(n)]


def run(batcher: MicroBatcher, models: list[LiveModel], jobs: list[tuple[list[str], list[str]]]) -> list[np.ndarray]:
    futures = [batcher.submit(models[i % len(models)], q, t) for i, (q, t) in enumerate(jobs)]  # all queued before the worker runs
    batcher.start()
    try:
        return [f.result(timeout=60) for f in futures]
    finally:
        batcher.stop()


def test_concurrent_requests_are_batched_without_splitting_and_each_keeps_its_model(tiny_model: Path, tmp_path: Path) -> None:
    a = LiveModel("a", load_student(tiny_model), "x", "a")
    b = LiveModel("b", load_student(variant(tiny_model, tmp_path / "b", noise=0.05)), "y", "b")
    jobs = jobs_of(20, 10)
    metrics = ServingMetrics()
    got = run(MicroBatcher(BatchParams(batching=True, max_batch_pairs=64, max_wait_s=0.05, forward_batch=16), metrics), [a, b], jobs)
    for i, (q, t) in enumerate(jobs):
        model = (a, b)[i % 2]
        np.testing.assert_allclose(got[i], model.student.predict_proba(q, t), atol=1e-5)
    page = metrics.render().decode()
    batches = metric(page, "broadfast_serving_batch_requests_count")
    assert batches == 4  # 20 requests of 10 pairs, at most 64 pairs a batch: 6 + 6 + 6 + 2
    assert metric(page, "broadfast_serving_batch_pairs_sum") == 200
    assert 'broadfast_serving_batch_pairs_bucket{le="64.0"} 4.0' in page  # no batch over the limit
    assert metric(page, "broadfast_serving_pairs_scored_total", 'version="a"') == 100


def test_without_batching_each_request_runs_alone(tiny_model: Path) -> None:
    a = LiveModel("a", load_student(tiny_model), "x", "a")
    metrics = ServingMetrics()
    got = run(MicroBatcher(BatchParams(batching=False, max_batch_pairs=256, max_wait_s=0.05, forward_batch=64), metrics), [a], jobs_of(5, 3))
    assert len(got) == 5 and all(g.shape == (3, 3) for g in got)
    page = metrics.render().decode()
    assert metric(page, "broadfast_serving_batch_requests_count") == 5 and metric(page, "broadfast_serving_batch_requests_sum") == 5


def test_a_failing_forward_fails_only_its_requests(tiny_model: Path) -> None:
    good = LiveModel("good", load_student(tiny_model), "x", "good")

    class Broken:
        def predict_proba(self, *args: object, **kw: object) -> np.ndarray:
            raise RuntimeError("boom")

    bad = LiveModel("bad", Broken(), "y", "bad")
    batcher = MicroBatcher(BatchParams(), ServingMetrics())
    f_bad = batcher.submit(bad, ["q"], ["t"])
    f_good = batcher.submit(good, ["q"], ["t"])
    batcher.start()
    try:
        assert f_good.result(timeout=30).shape == (1, 3)
        assert isinstance(f_bad.exception(timeout=30), RuntimeError)
    finally:
        batcher.stop()


def test_one_bad_request_fails_alone_and_its_batch_neighbours_get_their_own_scores(tiny_model: Path) -> None:
    model = LiveModel("m", load_student(tiny_model), "x", "m")
    jobs = jobs_of(6, 4)
    jobs.insert(3, (["garden hose"], ["t \udfff"]))  # a lone surrogate: the tokenizer raises on it
    metrics = ServingMetrics()
    batcher = MicroBatcher(BatchParams(batching=True, max_batch_pairs=256, max_wait_s=0.05, forward_batch=16), metrics)
    futures = [batcher.submit(model, q, t) for q, t in jobs]  # all queued before the worker runs: one batch
    batcher.start()
    try:
        assert futures[3].exception(timeout=60) is not None
        for i, (q, t) in enumerate(jobs):
            if i != 3:
                np.testing.assert_allclose(futures[i].result(timeout=60), model.student.predict_proba(q, t), atol=1e-5)
    finally:
        batcher.stop()
    page = metrics.render().decode()
    assert metric(page, "broadfast_serving_batch_requests_count") == 1  # they were batched together
    assert metric(page, "broadfast_serving_errors_total", 'kind="batch_retried"') == 1
    assert metric(page, "broadfast_serving_errors_total", 'kind="forward"') == 1  # the culprit alone
    assert metric(page, "broadfast_serving_pairs_scored_total", 'version="m"') == 24
