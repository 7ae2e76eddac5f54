"""Errors of the Feast feature repo."""

from __future__ import annotations

from broadfast.core.errors import BroadfastError, ConfigError


class FeatureStoreError(BroadfastError):
    """The feature repo is not applied, or the online store cannot be read or written."""


class FeatureEnvError(FeatureStoreError, ConfigError):
    """A variable the Feast repo reads (``${VAR}`` in feature_store.yaml, or the definitions) is unset."""
