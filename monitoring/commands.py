"""Command-line commands of monitoring/ (registered on the `broadfast` group in broadfast/cli.py).

Keep imports of heavy libraries inside the command functions so `broadfast --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from broadfast.cli_support import NOT_BUILT, command_settings, not_built


@click.command(help=NOT_BUILT.format(issue=8) + "One Evidently drift report, from two files or from recent traffic.")
@click.option("--reference", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--current", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def drift(reference: Path | None, current: Path | None, out: Path) -> None:
    command_settings()
    not_built(8, "drift reports")


@click.command(help=NOT_BUILT.format(issue=8) + "Periodic drift reports, A/B comparisons and alerts.")
def monitor() -> None:
    command_settings()
    not_built(8, "the monitor")


@click.command(help=NOT_BUILT.format(issue=8) + "The Evidently UI over the report workspace.")
def ui() -> None:
    command_settings()
    not_built(8, "the Evidently UI")
