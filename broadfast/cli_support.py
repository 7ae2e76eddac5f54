"""Helpers shared by every package's commands: settings from flags, the not-built marker."""

from __future__ import annotations

from typing import Any

from broadfast.errors import NotBuiltYet
from broadfast.logs import setup_logging
from broadfast.settings import Settings, get_settings

NOT_BUILT = "[not built yet: issue #{issue}] "


def command_settings(**overrides: Any) -> Settings:
    """The process settings with flag overrides (None means: not given), logging set up."""
    settings = get_settings(**overrides)
    setup_logging(settings.log_level)
    return settings


def not_built(issue: int, what: str) -> None:
    """Refuse clearly: the command exists, its capability is built by a later issue."""
    raise NotBuiltYet(f"{what} is not built yet (tracked in issue #{issue}); this command exists so the CLI's shape is stable.")
