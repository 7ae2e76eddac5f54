"""docker-compose.yml: valid against the Compose Specification's JSON schema, without a Docker engine."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click
import jsonschema
import pytest
import yaml

from broadfast.cli.main import main
from broadfast.core.settings import flat_fields

REPO = Path(__file__).resolve().parents[1]
SCHEMA = Path(sys.prefix) / "share" / "broadfast" / "compose_spec.json"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_valid_against_the_compose_spec_schema(compose: dict) -> None:
    if not SCHEMA.exists():
        pytest.fail(f"Compose schema missing at {SCHEMA}: run scripts/bootstrap.sh all,test (it fetches it)")
    schema = json.loads(SCHEMA.read_text())
    schema.pop("$schema", None)  # 2019-09 meta-schema URL; validate with draft 7 semantics
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_schema_catches_a_broken_file(compose: dict) -> None:
    schema = json.loads(SCHEMA.read_text())
    schema.pop("$schema", None)
    broken = json.loads(json.dumps(compose))
    broken["services"]["redis"]["restart_policy_typo"] = "always"
    assert list(jsonschema.Draft7Validator(schema).iter_errors(broken))


def test_topology_has_the_production_parts(compose: dict) -> None:
    services = compose["services"]
    assert {"kafka", "redis", "vllm", "serving", "stream", "labeler", "trainer", "monitor", "evidently-ui"} <= set(services)
    assert "zookeeper" not in services
    assert "broker" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft
    gpus = services["vllm"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in gpus)
    assert "--appendonly" in services["redis"]["command"]


def test_every_image_is_pinned(compose: dict) -> None:
    for name, svc in compose["services"].items():
        image = svc.get("image")
        assert image or svc.get("build"), name
        if image:
            assert re.search(r":(?!latest$)[\w.\-]+$|@sha256:[0-9a-f]{64}$", image), f"{name}: image {image!r} is not pinned"
    dockerfile = (REPO / "Dockerfile").read_text()
    for base in re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.M):
        assert ":" in base and not base.endswith(":latest"), base


def _resolve(argv: list[str]) -> click.Command:
    command: click.Command = main
    for word in argv:
        if word.startswith("-") or not isinstance(command, click.Group):
            break
        assert word in command.commands, f"`broadfast {' '.join(argv)}`: no command {word!r}"
        command = command.commands[word]
    return command


def test_every_service_command_exists_in_the_cli(compose: dict) -> None:
    seen = 0
    for name, svc in compose["services"].items():
        cmd = svc.get("command")
        if isinstance(cmd, list) and cmd and cmd[0] == "broadfast":
            command = _resolve(cmd[1:])
            assert not isinstance(command, click.Group), f"{name}: `{' '.join(cmd)}` names a group, not a command"
            options = {o for p in command.params for o in getattr(p, "opts", [])}
            for word in cmd[1:]:
                if word.startswith("--"):
                    assert word in options, f"{name}: `{' '.join(cmd)}`: unknown option {word}"
            seen += 1
    assert seen >= 6


def test_every_broadfast_variable_is_a_real_setting(compose: dict) -> None:
    fields = {f"BROADFAST_{name.upper()}" for name in flat_fields()}
    found = set()
    for svc in compose["services"].values():
        env = svc.get("environment") or {}
        keys = env.keys() if isinstance(env, dict) else [e.split("=", 1)[0] for e in env]
        found |= {k for k in keys if k.startswith("BROADFAST_")}
    assert found, "no BROADFAST_ settings in the compose file"
    assert found <= fields, f"not settings: {sorted(found - fields)}"
