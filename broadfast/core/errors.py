"""One root error for the project; each package raises a subclass of it.

Catch :class:`BroadfastError` at the edges (the CLI, a consumer loop) to turn any
expected failure into a clear message; anything else is a bug and should crash loudly.
"""

from __future__ import annotations


class BroadfastError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(BroadfastError):
    """A setting is missing or invalid."""


class EventValidationError(BroadfastError):
    """A payload does not match its event contract.

    ``field`` names the offending field (dotted path, ``<payload>`` for the whole
    message) and ``reason`` says what is wrong with it.
    """

    def __init__(self, event: str, field: str, reason: str) -> None:
        self.event = event
        self.field = field
        self.reason = reason
        super().__init__(f"invalid {event}: field '{field}': {reason}")


class StackError(BroadfastError):
    """The embedded broker or Redis could not be started, reached or stopped."""


class DataError(BroadfastError):
    """A data file is missing, unreadable or lacks required columns."""

