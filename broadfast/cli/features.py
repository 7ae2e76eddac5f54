"""Command-line commands of broadfast/features/ (registered on the `broadfast` group in broadfast/cli/main.py).

Keep imports of heavy libraries inside the command functions so `broadfast --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from broadfast.core.logs import command_settings


@click.group()
def features() -> None:
    """The Feast repo in broadfast/features/feature_repo/: apply, materialize, env for the `feast` CLI."""


@features.command("apply")
@click.option("--data", "data", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Relevance data set the ad attributes are built from [BROADFAST_DATA].")
@click.option("--files-only", is_flag=True, help="Only write the offline files; register with the plain `feast -c <repo> apply`.")
def features_apply(data: Path | None, files_only: bool) -> None:
    """Build the ad attributes from the data set and register every definition.

    Entities ad and query, the batch view ad_attributes, the push-source views
    ad_stream_counters and query_stream_counters, the feature service serving_v1 — the
    module-level objects of the repo (BROADFAST_FEAST_REPO, default the package's
    feature_repo/), as `feast apply` collects them. Registry and files go to
    BROADFAST_FEAST_DATA (default <home>/feast).
    """
    from broadfast.features.store import apply

    settings = command_settings(data=data)
    click.echo(json.dumps(apply(settings, register=not files_only), indent=2))


@features.command("materialize")
def features_materialize() -> None:
    """Load the batch features (ad attributes) into the Redis online store."""
    from broadfast.features.store import materialize

    click.echo(json.dumps(materialize(command_settings()), indent=2))


@features.command("env")
def features_env() -> None:
    """Print, as shell exports, the variables the Feast repo reads, and the repo's path.

    With them the plain `feast` CLI works on the same repo and store:

    \b
      eval "$(broadfast features env)"
      feast -c "$BROADFAST_FEAST_REPO" apply
      feast -c "$BROADFAST_FEAST_REPO" feature-views list
    """
    import shlex

    from broadfast.features.config import feast_env, repo_path

    settings = command_settings()
    values = {"BROADFAST_FEAST_REPO": str(repo_path(settings))} | feast_env(settings)
    for key, value in values.items():
        click.echo(f"export {key}={shlex.quote(value)}")
