"""Command-line commands of features/ (registered on the `broadfast` group in broadfast/cli.py).

Keep imports of heavy libraries inside the command functions so `broadfast --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from broadfast.cli_support import command_settings


@click.group()
def features() -> None:
    """The Feast feature repo in features/: apply and materialize."""


@features.command("apply")
@click.option("--data", "data", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Relevance data set the ad attributes are built from [BROADFAST_DATA].")
def features_apply(data: Path | None) -> None:
    """Build the ad attributes from the data set and register every definition.

    Entities ad and query, the batch view ad_attributes, the push-source views
    ad_stream_counters and query_stream_counters, the feature service serving_v1.
    Registry and files go to BROADFAST_FEAST_DATA (default <home>/feast).
    """
    from features.store import apply

    settings = command_settings(data=data)
    click.echo(json.dumps(apply(settings), indent=2))


@features.command("materialize")
def features_materialize() -> None:
    """Load the batch features (ad attributes) into the Redis online store."""
    from features.store import materialize

    click.echo(json.dumps(materialize(command_settings()), indent=2))


@features.command("env")
def features_env() -> None:
    """Print the values feature_store.yaml's ${...} placeholders take, as shell exports.

    With them the plain `feast` CLI reads the same repo:
      eval "$(broadfast features env)"; feast -c features/ feature-views list
    """
    import shlex

    from features.store import feast_env

    for key, value in feast_env(command_settings()).items():
        click.echo(f"export {key}={shlex.quote(value)}")
