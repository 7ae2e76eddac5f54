"""Errors of the Feast feature repo."""

from __future__ import annotations

from broadfast.errors import BroadfastError


class FeatureStoreError(BroadfastError):
    """The feature repo is not applied, or the online store cannot be read or written."""
