"""Command-line commands of features/ (registered on the `broadfast` group in broadfast/cli.py).

Keep imports of heavy libraries inside the command functions so `broadfast --help` stays fast.
"""

from __future__ import annotations

import click

from broadfast.cli_support import NOT_BUILT, command_settings, not_built


@click.group()
def features() -> None:
    """The Feast feature repo in features/: apply and materialize."""


@features.command("apply", help=NOT_BUILT.format(issue=6) + "Register the feature definitions.")
def features_apply() -> None:
    command_settings()
    not_built(6, "the Feast feature repo")


@features.command("materialize", help=NOT_BUILT.format(issue=6) + "Load batch features into the online store.")
def features_materialize() -> None:
    command_settings()
    not_built(6, "the Feast feature repo")
