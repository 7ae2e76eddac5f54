"""A/B rollout operations, shared by the admin HTTP endpoints and ``broadfast rollout``.

The experiment lives in Redis (:mod:`broadfast.core.experiments`); the champion outside an
experiment is the registry's (:mod:`broadfast.model.registry`). Promoting ends the experiment
*and* makes the challenger the registry's champion; every server following Redis then
serves the challenger to all traffic (within ``BROADFAST_SERVE_EXPERIMENT_POLL_S``).

>>> # exp = start(store, registry, "v0007", 0.1); status(store)["experiment"]["share"]
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from broadfast.core.experiments import Experiment, ExperimentError, ExperimentStore


def start(store: ExperimentStore, registry: Any, challenger: str, share: float, *, champion: str | None = None, salt: str | None = None) -> Experiment:
    """Start serving ``challenger`` to ``share`` of traffic against ``champion`` (default: the registry's)."""
    registry.show(challenger)  # RegistryError when unknown
    champion = champion or registry.champion()
    if champion is None:
        raise ExperimentError("the registry has no champion to compare the challenger with")
    return store.start(champion, challenger, share, salt=salt)


def status(store: ExperimentStore) -> dict[str, Any]:
    """The running experiment (else the latest one) with its per-arm counts."""
    exp = store.running()
    latest = exp or next(iter(store.history(limit=1)), None)
    if latest is None:
        return {"running": False, "experiment": None, "counts": None}
    return {"running": exp is not None, "experiment": asdict(latest), "counts": store.counts(latest.experiment_id)}


def promote(store: ExperimentStore, registry: Any, reason: str = "promoted by operator") -> Experiment:
    """End the experiment with the challenger as the winner, and make it the registry's champion."""
    exp = store.promote(reason)
    registry.promote(exp.challenger)
    return exp


def rollback(store: ExperimentStore, reason: str = "rolled back by operator") -> Experiment:
    """End the experiment; the champion takes all traffic again."""
    return store.rollback(reason)
