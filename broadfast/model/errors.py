"""Errors of broadfast/training/: a bad checkpoint, a bad labels file, a registry refusal."""

from __future__ import annotations

from broadfast.core.errors import BroadfastError, DataError


class CheckpointError(BroadfastError):
    """A model folder is missing, corrupt, or does not match its own configuration."""


class LabelsError(DataError):
    """A teacher labels file is unreadable or lacks the columns training needs."""


class RegistryError(BroadfastError):
    """The model registry cannot do what was asked (unknown version, unreachable index, …)."""


class ChecksumMismatch(RegistryError):
    """A registered model's files do not match the sha256 in its manifest."""
