"""Command-line commands of serving/ (registered on the `broadfast` group in broadfast/cli.py).

Keep imports of heavy libraries inside the command functions so `broadfast --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from broadfast.cli_support import NOT_BUILT, command_settings, not_built


@click.command(help=NOT_BUILT.format(issue=5) + "The scoring API: POST /v1/score, /healthz, /readyz, /metrics.")
@click.option("--model", type=click.Path(file_okay=False, path_type=Path), default=None, help="Model folder (default: the registry's champion).")
@click.option("--host", default=None, help="Bind address [BROADFAST_SERVE_HOST].")
@click.option("--port", type=int, default=None, help="Port [BROADFAST_SERVE_PORT].")
def serve(model: Path | None, host: str | None, port: int | None) -> None:
    command_settings(serve_host=host, serve_port=port)
    not_built(5, "the scoring API")



@click.group()
def rollout() -> None:
    """A/B rollouts of a challenger student: start, status, promote, rollback."""


@rollout.command("start", help=NOT_BUILT.format(issue=5) + "Serve a challenger version to a share of traffic.")
@click.option("--challenger", required=True)
@click.option("--share", type=click.FloatRange(0.0, 1.0), default=0.1, show_default=True)
def rollout_start(challenger: str, share: float) -> None:
    command_settings()
    not_built(5, "A/B rollouts")


@rollout.command("status", help=NOT_BUILT.format(issue=5) + "The running experiment and its comparison.")
def rollout_status() -> None:
    command_settings()
    not_built(5, "A/B rollouts")


@rollout.command("promote", help=NOT_BUILT.format(issue=5) + "Make the challenger the champion.")
def rollout_promote() -> None:
    command_settings()
    not_built(5, "A/B rollouts")


@rollout.command("rollback", help=NOT_BUILT.format(issue=5) + "Stop the experiment; the champion takes all traffic.")
def rollout_rollback() -> None:
    command_settings()
    not_built(5, "A/B rollouts")
