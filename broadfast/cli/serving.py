"""Command-line commands of broadfast/serving/ (registered on the `broadfast` group in broadfast/cli/main.py).

``serve`` runs the scoring API. ``rollout …`` works on the experiment store in Redis and the
registry directly (no HTTP call, so it needs BROADFAST_REDIS_URL and the registry, not the
admin token); every running server follows the change within BROADFAST_SERVE_EXPERIMENT_POLL_S.
The same operations exist as admin HTTP endpoints (/admin/rollout/…, bearer token).

Keep imports of heavy libraries inside the command functions so `broadfast --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from broadfast.core.logs import command_settings


@click.command(help="The scoring API: POST /v1/score, /healthz, /readyz, /metrics, /docs and the admin endpoints.")
@click.option("--model", type=click.Path(file_okay=False, path_type=Path), default=None, help="Model folder (default: the registry's champion).")
@click.option("--host", default=None, help="Bind address [BROADFAST_SERVE_HOST].")
@click.option("--port", type=int, default=None, help="Port [BROADFAST_SERVE_PORT].")
def serve(model: Path | None, host: str | None, port: int | None) -> None:
    settings = command_settings(serve_host=host, serve_port=port)
    from broadfast.serving.app import create_app
    from broadfast.serving.server import run

    if model is not None and not model.is_dir():
        raise click.BadParameter(f"{model} is not a folder", param_hint="--model")
    run(create_app(settings, model_dir=model), settings.serving.serve_host, settings.serving.serve_port, settings.log_level, settings.serving.serve_keep_alive_s)


def _parts() -> tuple[Any, Any]:
    settings = command_settings()
    from broadfast.core.experiments import ExperimentStore
    from broadfast.model.registry import Registry

    return ExperimentStore.from_settings(settings), Registry(settings)


def _echo(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group()
def rollout() -> None:
    """A/B rollouts of a challenger student: start, status, promote, rollback (Redis + registry)."""


@rollout.command("start", help="Serve a challenger version to a share of traffic (champion: the registry's).")
@click.option("--challenger", required=True, help="Registry version to try, e.g. v0007.")
@click.option("--share", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=0.1, show_default=True, help="Share of traffic (by user) for the challenger.")
@click.option("--salt", default=None, help="Assignment salt (default: random).")
def rollout_start(challenger: str, share: float, salt: str | None) -> None:
    from dataclasses import asdict

    from broadfast.serving import rollout as ops

    store, registry = _parts()
    _echo(asdict(ops.start(store, registry, challenger, share, salt=salt)))


@rollout.command("status", help="The running experiment (else the latest) and its per-arm request and error counts.")
def rollout_status() -> None:
    from broadfast.serving import rollout as ops

    store, _ = _parts()
    _echo(ops.status(store))


@rollout.command("promote", help="Make the challenger the champion (ends the experiment, promotes it in the registry).")
def rollout_promote() -> None:
    from dataclasses import asdict

    from broadfast.serving import rollout as ops

    store, registry = _parts()
    _echo(asdict(ops.promote(store, registry)))


@rollout.command("rollback", help="Stop the experiment; the champion takes all traffic.")
def rollout_rollback() -> None:
    from dataclasses import asdict

    from broadfast.serving import rollout as ops

    store, _ = _parts()
    _echo(asdict(ops.rollback(store)))
