"""Errors of the monitoring package."""

from __future__ import annotations

from broadfast.core.errors import BroadfastError, DataError


class MonitoringError(BroadfastError):
    """A report cannot be built (no traffic, no reference, unusable windows)."""


class WindowError(MonitoringError, DataError):
    """A window of pairs or events lacks what a report needs (columns, rows, scores)."""
