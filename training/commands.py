"""Command-line commands of training/ (registered on the `broadfast` group in broadfast/cli.py).

Keep imports of heavy libraries inside the command functions so `broadfast --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from broadfast.cli_support import NOT_BUILT, command_settings, not_built


@click.group()
def train() -> None:
    """Distil the student: offline from a file, or online from the labels topic."""


@train.command("offline", help=NOT_BUILT.format(issue=3) + "Distil the student from a parquet file of pairs (and teacher labels).")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--labels", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def train_offline(data: Path, labels: Path | None, out: Path) -> None:
    command_settings()
    not_built(3, "offline distillation")


@train.command("online", help=NOT_BUILT.format(issue=7) + "Distil continuously from relevance.labels and publish gated versions.")
def train_online() -> None:
    command_settings()
    not_built(7, "online distillation")


@click.command(help=NOT_BUILT.format(issue=3) + "Batch-score a parquet file of pairs (adds score and the grade probabilities).")
@click.option("--model", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
def predict(model: Path, data: Path, out: Path) -> None:
    command_settings()
    not_built(3, "batch prediction")


@click.group()
def registry() -> None:
    """Model versions: list, show, publish."""


@registry.command("list", help=NOT_BUILT.format(issue=3) + "List model versions.")
def registry_list() -> None:
    command_settings()
    not_built(3, "the model registry")


@registry.command("show", help=NOT_BUILT.format(issue=3) + "Show one version's manifest.")
@click.argument("version")
def registry_show(version: str) -> None:
    command_settings()
    not_built(3, "the model registry")


@registry.command("publish", help=NOT_BUILT.format(issue=3) + "Register a model folder as a new version and announce it.")
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=Path))
def registry_publish(model_dir: Path) -> None:
    command_settings()
    not_built(3, "the model registry")
