"""Errors of broadfast/serving/: a refused model version, a request the API will not score."""

from __future__ import annotations

from broadfast.core.errors import BroadfastError


class ServingError(BroadfastError):
    """The scoring API cannot do what was asked."""


class NotReady(ServingError):
    """No model is loaded yet (the registry has no champion, or the first load failed)."""


class BackendError(ServingError):
    """An inference backend cannot serve a model: ``stage`` ``convert`` (export, quantization or
    runtime failed) or ``backend`` (the converted model disagrees with PyTorch on the probe pairs)."""

    def __init__(self, stage: str, reason: str) -> None:
        self.stage = stage
        self.reason = reason
        super().__init__(reason)


class SwapRefused(ServingError):
    """A model version failed a check (``stage``: checksum, load, shapes, convert, backend, probe) and was not put live."""

    def __init__(self, version: str, stage: str, reason: str) -> None:
        self.version = version
        self.stage = stage
        self.reason = reason
        super().__init__(f"version {version} refused at the {stage} check: {reason}")
