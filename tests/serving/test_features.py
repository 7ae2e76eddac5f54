"""Optional online features: read from Feast per request and recorded on the scored events."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from broadfast.core.settings import Settings
from broadfast.core.datasets import load_pairs
from broadfast.core.events import decode
from tests.conftest import read_topic
from tests.serving.conftest import metric, running


def test_features_from_feast_are_recorded_and_a_failing_store_never_fails_scoring(
    tiny_model: Path, serve_settings: Settings, shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")  # feast sets it on import; undone after the test
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    from broadfast.features.store import apply, materialize

    df = load_pairs(shared_data / "homedepot" / "dev.parquet").iloc[:30]
    df.to_parquet(tmp_path / "ads.parquet", index=False)
    settings = serve_settings.model_copy(update={"serve_features": True, "feast_data": tmp_path / "feast"})
    apply(settings, tmp_path / "ads.parquet")
    materialize(settings)
    row = df.iloc[0]
    body = {"query": row["query"], "request_id": "r-feat", "ads": [{"ad_id": str(row["ad_id"]), "title": row["title"]}, {"ad_id": "never-seen", "title": "x"}]}
    with running(settings, tiny_model) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        assert client.post("/v1/score", json=body).status_code == 200
    events = sorted((decode("scored", r.value) for r in read_topic(settings, "scored", expect=2)), key=lambda e: e.position)
    assert events[0].features["ad_title_chars"] == len(row["title"])
    assert events[1].features["ad_title_chars"] == 0.0  # unknown ad: missing values read as 0

    broken = serve_settings.model_copy(update={"serve_features": True, "feast_data": tmp_path / "not-applied"})
    with running(broken, tiny_model) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(3):
            assert client.post("/v1/score", json=body | {"request_id": None}).status_code == 200
        assert metric(client.get("/metrics").text, "broadfast_serving_errors_total", 'kind="features"') == 1  # then it backs off
