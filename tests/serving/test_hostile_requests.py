"""Hostile requests (``tests/hostile/requests.jsonl``): each gets a 4xx with a JSON message that can
always be encoded, the valid requests in flight beside it get the scores they get alone, the same
keep-alive connection serves the next request, and the server never answers 500.

A corpus line: ``name``, the body (``body`` as text, or ``body_b64`` for bytes that are not UTF-8;
``<<c*N>>`` stands for the character ``c`` repeated N times), ``content_type`` (default JSON),
the expected ``status`` and a substring the message ``mentions``. The server runs with small limits
(20 ads, 500 characters, 20,000 bytes) so the size cases stay small.
"""

from __future__ import annotations

import base64
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from broadfast.core.settings import Settings
from tests.serving.conftest import metric, running, score_body

CORPUS = [json.loads(line) for line in (Path(__file__).resolve().parents[1] / "hostile" / "requests.jsonl").read_text().splitlines() if line.strip()]
REPEAT = re.compile(rb"<<(.)\*(\d+)>>")


def body_of(case: dict) -> bytes:
    raw = base64.b64decode(case["body_b64"]) if "body_b64" in case else case["body"].encode("utf-8")
    return REPEAT.sub(lambda m: m.group(1) * int(m.group(2)), raw)


def scores(response: httpx.Response) -> list[float]:
    assert response.status_code == 200, response.text
    return [r["score"] for r in response.json()["results"]]


def test_the_corpus_is_large_and_named() -> None:
    names = [c["name"] for c in CORPUS]
    assert len(names) >= 50 and len(set(names)) == len(names)
    assert all(400 <= c["status"] < 500 for c in CORPUS)


def test_every_hostile_request_gets_a_clear_4xx_and_hurts_no_one(tiny_model: Path, serve_settings: Settings) -> None:
    settings = serve_settings.model_copy(update={"serve_max_ads": 20, "serve_max_text_chars": 500, "serve_max_body_bytes": 20_000})
    valid = [score_body(q, titles) for q, titles in (("cordless drill", ["20V drill kit", "garden hose", "drill bits"]), ("led bulb", ["A19 LED bulb"]), ("paint roller", ["roller cover", "tray", "ladder", "paint"]))]
    with running(settings, tiny_model) as (url, _):

        def post(body: bytes, content_type: str = "application/json") -> httpx.Response:
            with httpx.Client(base_url=url, timeout=30) as client:
                return client.post("/v1/score", content=body, headers={"content-type": content_type})

        alone = [scores(post(json.dumps(v).encode())) for v in valid]
        with ThreadPoolExecutor(max_workers=len(valid) + 1) as pool, httpx.Client(base_url=url, timeout=30) as keep_alive:
            for case in CORPUS:
                beside = [pool.submit(post, json.dumps(v).encode()) for v in valid]
                bad = keep_alive.post("/v1/score", content=body_of(case), headers={"content-type": case.get("content_type", "application/json")})
                assert bad.status_code == case["status"], (case["name"], bad.status_code, bad.text[:300])
                assert bad.headers["content-type"].startswith("application/json"), case["name"]
                detail = bad.json()["detail"]
                assert case["mentions"] in json.dumps(detail, ensure_ascii=False), (case["name"], detail)
                for got, want in zip(beside, alone):
                    np.testing.assert_allclose(scores(got.result()), want, atol=1e-6, err_msg=case["name"])
                # the same keep-alive connection serves the next request (a 500 with an unencodable body used to break it)
                np.testing.assert_allclose(scores(keep_alive.post("/v1/score", json=valid[0])), alone[0], atol=1e-6, err_msg=case["name"])
            assert keep_alive.get("/healthz").status_code == 200
            page = keep_alive.get("/metrics").text
    assert metric(page, "broadfast_serving_errors_total") == 0  # nothing reached the model and failed
    assert metric(page, "broadfast_serving_rejected_requests_total") == len(CORPUS)  # each refusal counted, by status
