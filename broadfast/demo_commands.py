"""Command-line commands of the demo (registered on the `broadfast` group in broadfast/cli.py).

Keep imports of heavy libraries inside the command functions so `broadfast --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from broadfast.cli_support import NOT_BUILT, command_settings, not_built


@click.command(help=NOT_BUILT.format(issue=7) + "The main job: the whole loop on the embedded stack with a live view and a summary.")
@click.option("--duration", type=float, default=300.0, show_default=True, help="Seconds of traffic.")
@click.option("--teacher", type=click.Choice(["transformers", "oracle", "vllm"]), default=None, help="Teacher backend [BROADFAST_TEACHER_BACKEND].")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Data set to replay [BROADFAST_DATA].")
@click.option("--summary", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the summary as JSON here.")
def demo(duration: float, teacher: str | None, data: Path | None, summary: Path | None) -> None:
    command_settings()
    not_built(7, "the demo (the whole online loop)")
