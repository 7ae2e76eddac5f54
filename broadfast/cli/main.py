"""The ``broadfast`` command line: one console script, one group per component.

Settings come from ``BROADFAST_…`` environment variables; a flag overrides its variable.
An expected failure (a :class:`~broadfast.core.errors.BroadfastError`) ends a command with one
clear line on stderr and exit status 1; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click

from broadfast import __version__
from broadfast.core.logs import command_settings
from broadfast.core.errors import BroadfastError

log = logging.getLogger("broadfast")


class BroadfastGroup(click.Group):
    """Turns expected errors into one clear line and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BroadfastError as exc:
            click.secho(f"broadfast: error: {exc}", fg="red", err=True)
            sys.exit(1)


@click.group(cls=BroadfastGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="broadfast")
def main() -> None:
    """broadfast — streaming online-learning relevance for search ads.

    \b
    A fast student scores query–ad pairs; the pairs it finds hard are labelled by a
    slow, broad teacher (an LLM reasoning from several perspectives); the student keeps
    distilling those labels and is hot-swapped into serving while drift is watched.

    \b
    Quick start (one machine):
      eval "$(broadfast stack up)"      # broker + Redis on loopback, prints exports
      broadfast replay --data ../shared/data/homedepot/dev.parquet --limit 500
      broadfast stack down

    Settings come from BROADFAST_* environment variables (see `broadfast settings`).
    """


# -- settings ------------------------------------------------------------------------------
@main.command("settings")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON instead of shell exports.")
@click.option("--markdown", is_flag=True, help="Print the table of every setting (variable, default, meaning).")
def settings_cmd(as_json: bool, markdown: bool) -> None:
    """Print the effective settings (secrets are never printed)."""
    if markdown:
        from broadfast.core.settings import settings_table

        click.echo(settings_table())
        return
    settings = command_settings()
    env = settings.public_env()
    env["BROADFAST_ADMIN_TOKEN"] = "<set>" if settings.serving.admin_token else "<unset>"
    if as_json:
        click.echo(json.dumps(env, indent=2))
    else:
        for key, value in env.items():
            click.echo(f"{key}={value}")



def _register() -> None:
    from broadfast.cli.demo import demo
    from broadfast.cli.features import features
    from broadfast.cli.monitoring import drift, monitor, ui
    from broadfast.cli.serving import rollout, serve
    from broadfast.cli.stream import replay, stack, stream
    from broadfast.cli.training import predict, registry, train
    from broadfast.cli.teacher import label, teacher

    for command in (stack, demo, replay, serve, stream, label, train, predict, registry, rollout, features, drift, monitor, ui, teacher):
        main.add_command(command)


_register()

if __name__ == "__main__":  # pragma: no cover
    main()
