"""A/B rollouts: sticky assignment close to the share, both versions resident, arms on the scored events."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from broadfast.cli.main import main
from broadfast.core.settings import Settings
from broadfast.core.experiments import ExperimentStore, assign, assignment_key
from broadfast.core.events import decode
from tests.conftest import read_topic
from tests.serving.conftest import ADMIN_TOKEN, running, score_body
from broadfast.model.registry import Registry

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def wait_for(predicate, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def cli_env(serve_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The environment `broadfast rollout …` reads, pointing at the test's Redis, topics and registry."""
    for key, value in {"REDIS_URL": serve_settings.redis.redis_url, "TOPIC_PREFIX": serve_settings.kafka.topic_prefix, "REGISTRY_ROOT": str(serve_settings.registry_root),
                       "KAFKA_BOOTSTRAP": serve_settings.kafka.kafka_bootstrap, "KAFKA_FLAVOR": "tansu"}.items():  # fmt: skip
        monkeypatch.setenv(f"BROADFAST_{key}", value)
    return serve_settings


def test_assignment_is_sticky_close_to_the_share_and_on_every_event(tiny_model: Path, make_variant, serve_settings: Settings, cli_env: Settings) -> None:
    registry = Registry(serve_settings)
    registry.publish(tiny_model)
    registry.publish(make_variant("challenger", noise=0.01), announce=False)
    users = [f"user-{i}" for i in range(300)]
    with running(serve_settings) as (url, engine), httpx.Client(base_url=url, timeout=30) as client:
        started = client.post("/admin/rollout/start", json={"challenger": "v0002", "share": 0.3, "salt": "fixed-salt"}, headers=AUTH)
        assert started.status_code == 200, started.text
        exp = started.json()["experiment"]
        arms: dict[str, set[str]] = {u: set() for u in users}
        for rnd in range(2):
            for u in users:
                data = client.post("/v1/score", json=score_body("drill", ["drill", "hose"], user_id=u)).json()
                assert data["experiment_id"] == exp["experiment_id"]
                assert data["model_version"] == ("v0002" if data["arm"] == "challenger" else "v0001")
                arms[u].add(data["arm"])
        assert all(len(a) == 1 for a in arms.values())  # sticky per user
        challenger_users = [u for u, a in arms.items() if a == {"challenger"}]
        assert abs(len(challenger_users) / len(users) - 0.3) < 0.08
        assert all(assign(assignment_key(u, "ignored"), 0.3, exp["salt"]) == "challenger" for u in challenger_users)  # anyone can recompute it
        wait_for(lambda: sum(ExperimentStore.from_settings(serve_settings).counts(exp["experiment_id"])[a]["requests"] for a in ("champion", "challenger")) == 600)
        status = CliRunner().invoke(main, ["rollout", "status"])
        assert status.exit_code == 0 and '"running": true' in status.output and f'"requests": {2 * len(challenger_users)}' in status.output

        promoted = CliRunner().invoke(main, ["rollout", "promote"])  # the CLI works on Redis + registry; the server follows
        assert promoted.exit_code == 0, promoted.output
        wait_for(lambda: engine.champion_version == "v0002" and engine.routing.experiment is None)
        data = client.post("/v1/score", json=score_body("drill", ["drill"], user_id=users[0])).json()
        assert data["model_version"] == "v0002" and data["arm"] == "champion" and data["experiment_id"] is None
        assert registry.champion() == "v0002"
    events = [decode("scored", r.value) for r in read_topic(serve_settings, "scored", expect=1201)]
    in_exp = [e for e in events if e.experiment_id == exp["experiment_id"]]
    assert len(in_exp) == 1200
    for e in in_exp:
        assert e.arm == ("challenger" if e.user_id in challenger_users else "champion")
        assert e.model_version == ("v0002" if e.arm == "challenger" else "v0001")


def test_rollout_from_the_cli_is_followed_and_rolled_back(tiny_model: Path, make_variant, serve_settings: Settings, cli_env: Settings) -> None:
    registry = Registry(serve_settings)
    registry.publish(tiny_model)
    registry.publish(make_variant("challenger", noise=0.01), announce=False)
    registry.publish(make_variant("skewed", head_bias=(9.0, 0.0, -9.0)), announce=False)
    with running(serve_settings) as (url, engine), httpx.Client(base_url=url, timeout=30) as client:
        refused = client.post("/admin/rollout/start", json={"challenger": "v0003", "share": 0.5}, headers=AUTH)
        assert refused.status_code == 409 and "agreement" in refused.json()["detail"]
        assert ExperimentStore.from_settings(serve_settings).running() is None  # not started
        result = CliRunner().invoke(main, ["rollout", "start", "--challenger", "v0002", "--share", "0.5"])
        assert result.exit_code == 0, result.output
        wait_for(lambda: engine.routing.challenger is not None)
        arms = {client.post("/v1/score", json=score_body("drill", ["drill"], user_id=f"u{i}")).json()["arm"] for i in range(40)}
        assert arms == {"champion", "challenger"}
        back = client.post("/admin/rollout/rollback", headers=AUTH)
        assert back.status_code == 200 and back.json()["experiment"]["status"] == "rolled_back"
        assert engine.routing.challenger is None and engine.champion_version == "v0001"
        again = client.post("/admin/rollout/rollback", headers=AUTH)
        assert again.status_code == 409 and "no experiment" in again.json()["detail"]
        versions = {client.post("/v1/score", json=score_body("drill", ["drill"], user_id=f"u{i}")).json()["model_version"] for i in range(40)}
        assert versions == {"v0001"}
    unknown = CliRunner().invoke(main, ["rollout", "start", "--challenger", "v0999"])
    assert unknown.exit_code == 1 and "v0999" in unknown.output
