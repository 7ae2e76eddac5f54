"""The scoring API against a real server (uvicorn on a free port) with a tiny student."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
from click.testing import CliRunner

from broadfast.cli.main import main
from broadfast.core.settings import Settings
from broadfast.serving.backends import resolve_backend
from broadfast.serving.models import device_of
from broadfast.core.datasets import load_pairs
from broadfast.core.events import Scored, decode
from tests.conftest import read_topic
from broadfast.model.student import DESCRIPTION_CHARS, student_text
from tests.serving.conftest import ADMIN_TOKEN, metric, running, score_body


def test_scores_equal_broadfast_predict_on_the_same_pairs(tiny_model: Path, serve_settings: Settings, shared_data: Path, tmp_path: Path) -> None:
    df = load_pairs(shared_data / "homedepot" / "dev.parquet").iloc[:60].reset_index(drop=True)
    df.to_parquet(tmp_path / "pairs.parquet", index=False)
    result = CliRunner().invoke(main, ["predict", "--model", str(tiny_model), "--data", str(tmp_path / "pairs.parquet"), "--out", str(tmp_path / "pred.parquet"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    expected = pd.read_parquet(tmp_path / "pred.parquet")

    got = np.zeros((len(df), 4))
    with running(serve_settings, tiny_model) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        for query, rows in df.groupby("query", sort=False):
            body = {"query": query, "ads": [{"ad_id": str(r.ad_id), "title": r.title, "text": r.text} for r in rows.itertuples()]}
            response = client.post("/v1/score", json=body)
            assert response.status_code == 200, response.text
            results = response.json()["results"]
            assert [r["ad_id"] for r in results] == [str(p) for p in rows["ad_id"]]  # input order
            for i, r in zip(rows.index, results):
                got[i] = [r["score"], *r["grade_probs"]]
    want = expected[["score", "p_irrelevant", "p_partial", "p_exact"]].to_numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got[:, 0].std() > 0  # the pairs are told apart, not one constant


def test_response_shape_health_readiness_metrics_and_docs(tiny_model: Path, serve_settings: Settings) -> None:
    with running(serve_settings, tiny_model) as (url, engine), httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["champion"] == engine.champion_version
        # what the demo's summary reports: the backend the setting resolves to on this device (auto: onnx-int8 on a CPU)
        assert ready.json()["backend"]["name"] == resolve_backend(serve_settings.serving.serve_backend, device_of(serve_settings))
        body = score_body("cordless drill", ["drill driver kit", "garden hose"], user_id="u1")
        data = client.post("/v1/score", json=body).json()
        assert set(data) == {"request_id", "model_version", "arm", "experiment_id", "results"}
        assert data["request_id"] == body["request_id"] and data["arm"] == "champion" and data["experiment_id"] is None
        for r in data["results"]:
            assert abs(sum(r["grade_probs"]) - 1) < 1e-4 and abs(r["score"] - (r["grade_probs"][2] + 0.5 * r["grade_probs"][1])) < 1e-9
        page = client.get("/metrics").text
        assert metric(page, "broadfast_serving_request_latency_seconds_count") == 1
        assert metric(page, "broadfast_serving_live_version", f'version="{engine.champion_version}"') == 1
        assert metric(page, "broadfast_serving_batch_pairs_sum") == 2
        spec = client.get("/openapi.json").json()
        assert "/v1/score" in spec["paths"] and "/admin/rollout/start" in spec["paths"]
        assert client.get("/docs").status_code == 200


def test_not_ready_without_a_champion(serve_settings: Settings) -> None:
    with running(serve_settings) as (url, _), httpx.Client(base_url=url, timeout=30) as client:  # empty registry
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
        response = client.post("/v1/score", json=score_body("drill", ["drill"]))
        assert response.status_code == 503 and "no model" in response.json()["detail"]


def test_oversized_and_malformed_requests_get_a_clear_4xx(tiny_model: Path, serve_settings: Settings) -> None:
    settings = serve_settings.model_copy(update={"serve_max_ads": 5, "serve_max_text_chars": 100, "serve_max_body_bytes": 4096})
    with running(settings, tiny_model) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        too_many = client.post("/v1/score", json=score_body("drill", ["t"] * 6))
        assert too_many.status_code == 413 and "6 ads" in too_many.json()["detail"] and "limit is 5" in too_many.json()["detail"]
        too_long = client.post("/v1/score", json=score_body("drill", ["x" * 101]))
        assert too_long.status_code == 422 and "ads[0].title" in too_long.json()["detail"]
        too_big = client.post("/v1/score", content=json.dumps(score_body("drill", ["y" * 90] * 5) | {"pad": "z" * 5000}), headers={"content-type": "application/json"})
        assert too_big.status_code == 413 and "exceeds the limit of 4,096 bytes" in too_big.json()["detail"]

        def chunks():  # no Content-Length: the limit is enforced while reading
            yield b'{"query": "drill", "ads": ['
            for _ in range(100):
                yield b'{"ad_id": "a", "title": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"},'
            yield b'{"ad_id": "a", "title": "x"}]}'

        streamed = client.post("/v1/score", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413
        missing = client.post("/v1/score", json={"ads": [{"ad_id": "a", "title": "t"}]})
        assert missing.status_code == 422 and any(e["loc"][-1] == "query" for e in missing.json()["detail"])
        empty = client.post("/v1/score", json={"query": "drill", "ads": []})
        assert empty.status_code == 422
        for body, field in ((score_body("   ", ["t"]), "query"), (score_body("drill", [" \t"]), "title"), (score_body("drill \udfff", ["t"]), "query"), (score_body("drill", ["t \udfff"]), "title")):
            bad = client.post("/v1/score", content=json.dumps(body), headers={"content-type": "application/json"})  # json.dumps escapes the surrogate as \udfff
            assert bad.status_code == 422, (body, bad.text)
            assert any(e["loc"][-1] == field for e in bad.json()["detail"]), bad.text
        nan = client.post("/v1/score", content=b'{"query": NaN, "ads": [{"ad_id": "a", "title": "t"}]}', headers={"content-type": "application/json"})
        assert nan.status_code == 422 and "NaN is not a JSON number" in nan.json()["detail"][0]["msg"]
        assert client.post("/v1/score", json=score_body("drill", ["ok"])).status_code == 200  # the same connection still serves
        assert client.post("/v1/score", json=score_body("drill", ["ok"] * 5)).status_code == 200  # within the limits
        page = client.get("/metrics").text
        assert metric(page, "broadfast_serving_rejected_requests_total", 'status="413"') == 3


def test_admin_endpoints_need_the_bearer_token(tiny_model: Path, serve_settings: Settings) -> None:
    with running(serve_settings, tiny_model) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        for method, path in (("GET", "/admin/rollout/status"), ("POST", "/admin/rollout/promote"), ("POST", "/admin/rollout/rollback"), ("GET", "/admin/models")):
            assert client.request(method, path).status_code == 401
            wrong = client.request(method, path, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert client.post("/admin/rollout/start", json={"challenger": "v0002"}).status_code == 401
        ok = client.get("/admin/rollout/status", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert ok.status_code == 200 and ok.json()["running"] is False
    off = serve_settings.model_copy(update={"admin_token": None})
    with running(off, tiny_model) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        refused = client.get("/admin/rollout/status", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert refused.status_code == 403 and "BROADFAST_ADMIN_TOKEN" in refused.json()["detail"]


def test_every_scored_pair_reaches_relevance_scored(tiny_model: Path, serve_settings: Settings) -> None:
    with running(serve_settings, tiny_model) as (url, engine), httpx.Client(base_url=url, timeout=30) as client:
        bodies = [score_body(q, [f"{q} ad {i}" for i in range(n)], user_id=f"u{n}") for q, n in (("drill", 3), ("hose", 4), ("paint", 2))]
        bodies[0]["ads"][0]["text"] = "  18V cordless drill. " + "x" * (DESCRIPTION_CHARS + 50)  # longer than the student reads
        answers = [client.post("/v1/score", json=b).json() for b in bodies]
    records = read_topic(serve_settings, "scored", expect=9)
    events = [decode("scored", r.value) for r in records]
    assert len(events) == 9 and all(isinstance(e, Scored) for e in events)
    by_key = {(e.request_id, e.ad_id): e for e in events}
    for body, answer in zip(bodies, answers):
        for pos, (ad, result) in enumerate(zip(body["ads"], answer["results"])):
            e = by_key[(body["request_id"], ad["ad_id"])]
            assert e.position == pos and e.title == ad["title"] and e.query == body["query"] and e.user_id == body["user_id"]
            assert student_text(e.title, e.text) == student_text(ad["title"], ad.get("text", "")), "the event must carry what the student read"
            assert len(e.text) <= DESCRIPTION_CHARS
            assert abs(e.score - result["score"]) < 1e-9 and e.model_version == engine.champion_version
            assert e.arm == "champion" and e.experiment_id is None and e.latency_ms > 0
    assert {r.key for r in records} == {b"drill", b"hose", b"paint"}


def test_scoring_goes_on_when_kafka_is_unreachable(tiny_model: Path, serve_settings: Settings) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    settings = serve_settings.model_copy(update={"kafka_bootstrap": dead, "serve_scored_buffer": 2})
    with running(settings, tiny_model) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        for i in range(6):
            response = client.post("/v1/score", json=score_body("drill", [f"drill {j}" for j in range(5)]))
            assert response.status_code == 200 and len(response.json()["results"]) == 5
        page = client.get("/metrics").text
    # two requests fit the buffer; the other four (20 events) are dropped and counted
    assert metric(page, "broadfast_serving_scored_events_dropped_total") == 20
    assert metric(page, "broadfast_serving_requests_total") == 6


def test_broadfast_serve_runs_the_api_from_the_command_line(tiny_model: Path, serve_settings: Settings) -> None:
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | serve_settings.public_env() | {"BROADFAST_SERVE_PORT": str(port), "BROADFAST_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "broadfast.cli.main", "serve", "--model", str(tiny_model), "--host", "127.0.0.1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "broadfast serve did not become ready"
            time.sleep(0.2)
        data = httpx.post(url + "/v1/score", json=score_body("drill", ["cordless drill", "hose"]), timeout=30).json()
        assert data["model_version"].startswith("model-") and len(data["results"]) == 2
    finally:
        proc.terminate()
        code = proc.wait(timeout=30)
    out = proc.stdout.read().decode()
    assert code in (0, -15) and "Traceback" not in out, out[-2000:]  # uvicorn re-raises SIGTERM after a graceful shutdown


def test_concurrent_http_requests_are_merged_into_one_forward_pass(tiny_model: Path, serve_settings: Settings) -> None:
    """Six clients post at once; the micro-batcher, waiting up to 400 ms for company, scores their pairs in
    fewer forward passes than requests, and each client still gets its own pairs' scores."""
    import concurrent.futures

    settings = serve_settings.model_copy(update={"serve_backend": "torch", "serve_max_wait_ms": 400.0})
    bodies = [score_body(f"query {i}", [f"ad {i} {k}" for k in range(3)]) for i in range(6)]
    with running(settings, tiny_model) as (url, engine), httpx.Client(base_url=url, timeout=30) as client:
        before = client.get("/metrics").text
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            responses = list(pool.map(lambda b: httpx.post(url + "/v1/score", json=b, timeout=30), bodies))
        page = client.get("/metrics").text
        student = engine.routing.champion.student
    passes = metric(page, "broadfast_serving_batch_requests_count") - metric(before, "broadfast_serving_batch_requests_count")
    merged = metric(page, "broadfast_serving_batch_requests_sum") - metric(before, "broadfast_serving_batch_requests_sum")
    assert merged == 6 and passes < 6, f"6 concurrent requests took {passes:.0f} forward passes"
    for body, r in zip(bodies, responses):
        assert r.status_code == 200 and r.json()["request_id"] == body["request_id"]
        want = student.predict_proba([body["query"]] * 3, [a["title"] for a in body["ads"]])
        np.testing.assert_allclose([x["grade_probs"] for x in r.json()["results"]], want, atol=1e-5)
