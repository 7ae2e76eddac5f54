"""Hot swap: versions announced on relevance.models go live after their checks, or are refused."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from broadfast.core.settings import Settings
from broadfast.serving.errors import SwapRefused
from broadfast.serving.models import load_folder
from broadfast.core.bus import EventBus
from broadfast.core.events import Alert, ModelPublished, decode, now
from tests.conftest import read_topic
from tests.serving.conftest import ADMIN_TOKEN, metric, running, score_body
from broadfast.model.registry import Registry


def wait_for(predicate, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_swap_under_200_requests_in_flight_fails_none(tiny_model: Path, make_variant, serve_settings: Settings) -> None:
    registry = Registry(serve_settings)
    assert registry.publish(tiny_model).version == "v0001"
    nudged = make_variant("nudged", noise=0.01)
    with running(serve_settings, wait_watcher=True) as (url, engine):
        assert engine.champion_version == "v0001"
        results: list[tuple[float, float, int, str | None]] = []  # (start, end, status, version)
        swap_seen: list[float] = []

        async def client_loop(client: httpx.AsyncClient, i: int, stop_evt: asyncio.Event) -> None:
            while not stop_evt.is_set():
                t0 = time.monotonic()
                try:
                    r = await client.post("/v1/score", json=score_body("cordless drill", [f"drill {i} {k}" for k in range(10)], user_id=f"u{i}"))
                    results.append((t0, time.monotonic(), r.status_code, r.json().get("model_version") if r.status_code == 200 else None))
                except httpx.HTTPError as exc:
                    results.append((t0, time.monotonic(), -1, repr(exc)))

        async def load() -> None:
            stop_evt = asyncio.Event()
            limits = httpx.Limits(max_connections=220, max_keepalive_connections=220)
            async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
                tasks = [asyncio.create_task(client_loop(client, i, stop_evt)) for i in range(200)]
                await asyncio.sleep(1.0)
                publisher = threading.Thread(target=registry.publish, args=(nudged,))
                publish_started = time.monotonic()
                publisher.start()
                while engine.champion_version != "v0002":
                    assert time.monotonic() - publish_started < 60, "the new version never went live"
                    await asyncio.sleep(0.01)
                swap_seen.append(time.monotonic())
                await asyncio.sleep(1.0)
                # keep the load on until the run holds enough requests to mean something (a loaded machine serves fewer a second)
                while len(results) < 400 and time.monotonic() - swap_seen[0] < 30:
                    await asyncio.sleep(0.05)
                stop_evt.set()
                await asyncio.gather(*tasks)
                publisher.join()

        asyncio.run(load())
        page = httpx.get(url + "/metrics").text
    assert len(results) >= 400
    failed = [r for r in results if r[2] != 200]
    assert not failed, failed[:5]
    versions = {r[3] for r in results}
    assert versions == {"v0001", "v0002"}
    after = [r for r in results if r[0] > swap_seen[0]]
    assert after and all(r[3] == "v0002" for r in after)  # requests begun after the swap see the new version
    assert metric(page, "broadfast_serving_swaps_total") == 1
    assert metric(page, "broadfast_serving_live_version", 'version="v0002"') == 1
    assert metric(page, "broadfast_serving_live_version", 'version="v0001"') == 0


def _alerts(settings: Settings, n: int) -> list[Alert]:
    return [decode("alerts", r.value) for r in read_topic(settings, "alerts", expect=n)]


def test_corrupt_version_is_refused_with_an_alert_and_the_old_keeps_serving(tiny_model: Path, make_variant, serve_settings: Settings) -> None:
    registry = Registry(serve_settings)
    registry.publish(tiny_model)
    with running(serve_settings, wait_watcher=True) as (url, engine), httpx.Client(base_url=url, timeout=30) as client:
        manifest = registry.publish(make_variant("next", noise=0.01), announce=False)
        weights = registry.store.local_copy(registry.name, manifest.version) / "model.safetensors"
        raw = bytearray(weights.read_bytes())
        raw[-64:] = b"\x00" * 64  # bit rot in the stored weights
        weights.write_bytes(bytes(raw))
        registry.announce(manifest)
        wait_for(lambda: "v0002" in engine.refused, what="the refusal")
        response = client.post("/v1/score", json=score_body("drill", ["drill"]))
        assert response.status_code == 200 and response.json()["model_version"] == "v0001"
        assert metric(client.get("/metrics").text, "broadfast_serving_swap_refusals_total", 'stage="checksum"') == 1
    (alert,) = _alerts(serve_settings, 1)
    assert alert.kind == "swap_failed" and alert.details["version"] == "v0002" and alert.details["stage"] == "checksum"
    assert alert.details["live_version"] == "v0001" and "sha256" in alert.details["reason"]


def test_disagreeing_or_misannounced_versions_are_refused(tiny_model: Path, make_variant, serve_settings: Settings) -> None:
    registry = Registry(serve_settings)
    registry.publish(tiny_model)
    with running(serve_settings, wait_watcher=True) as (url, engine), httpx.Client(base_url=url, timeout=30) as client:
        registry.publish(make_variant("skewed", head_bias=(9.0, 0.0, -9.0)))  # scores pushed to ~0: far from the live ~0.5
        wait_for(lambda: "v0002" in engine.refused, what="the probe refusal")
        assert "agreement" in engine.refused["v0002"] and "below the floor" in engine.refused["v0002"]
        good = registry.publish(make_variant("good", noise=0.01), announce=False)
        with EventBus(serve_settings) as bus:  # announced with a checksum that is not the manifest's
            bus.publish(ModelPublished(version=good.version, uri=good.uri, sha256="0" * 64, ts=now())).get(timeout=10)
        wait_for(lambda: good.version in engine.refused, what="the checksum refusal")
        assert engine.champion_version == "v0001"
        assert client.post("/v1/score", json=score_body("drill", ["drill"])).json()["model_version"] == "v0001"
        # an operator can still load a good version explicitly (checked the same way)
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        fresh = registry.publish(make_variant("fresh", noise=0.01, seed=3), announce=False)
        loaded = client.post("/admin/models/load", json={"version": fresh.version}, headers=auth)
        assert loaded.status_code == 200 and loaded.json()["status"] == "live" and loaded.json()["probe"]["agreement"] > 0.9
        assert client.post("/v1/score", json=score_body("drill", ["drill"])).json()["model_version"] == fresh.version
        unknown = client.post("/admin/models/load", json={"version": "v0999"}, headers=auth)
        assert unknown.status_code == 409 and "v0999" in unknown.json()["detail"]
    alerts = [decode("alerts", r.value) for r in read_topic(serve_settings, "alerts", expect=4, timeout_s=4)]
    assert sorted((a.details["version"], a.details["stage"]) for a in alerts) == [("v0002", "probe"), ("v0003", "checksum"), ("v0999", "registry")]


def test_a_checkpoint_that_does_not_match_its_config_is_refused(tiny_model: Path, tmp_path: Path, serve_settings: Settings) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    config = (broken / "config.json").read_text().replace('"latent_dim": 16', '"latent_dim": 24')
    (broken / "config.json").write_text(config)
    with pytest.raises(SwapRefused) as info:
        load_folder(broken, serve_settings)
    assert info.value.stage == "load" and "does not match its config" in info.value.reason


def test_a_model_that_scores_everything_alike_fails_the_probe(tiny_model: Path) -> None:
    import torch

    from broadfast.serving.models import LiveModel, probe
    from broadfast.model.student import load_student

    flat = load_student(tiny_model)
    with torch.no_grad():
        flat.head[-1].weight.zero_()  # the head ignores its input: one score for every pair
    with pytest.raises(SwapRefused) as info:
        probe(LiveModel("flat", flat, "x", "flat"), None, floor=0.0)
    assert info.value.stage == "probe" and "same score" in info.value.reason
    report = probe(LiveModel("ok", load_student(tiny_model), "y", "ok"), None, floor=0.0)  # the tiny random model still ranks
    assert report["spread"] > 0
