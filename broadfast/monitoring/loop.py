"""The loop's own figures, once a monitoring round: is it labelling, and is the served model good?

From the round's window (:mod:`broadfast.monitoring.traffic`) over the last ``monitor_interval_s``: teacher
labels per minute, hard cases per minute and the hard-case rate (hard cases / scored pairs); from
the registry, the serving version's validation figures as the online trainer measured them when it
published it (``val_spearman``, ``val_ndcg@10`` on its fixed slice, ``stream_spearman`` on the
newest held-out traffic labels). Saved as an Evidently report tagged ``loop`` — a one-row frame
under ``MeanValue`` metrics, the mean of one value being the value — so the drift project's
dashboard plots them round by round (:mod:`broadfast.monitoring.dashboards`).

>>> import pandas as pd
>>> frames = {"scored": pd.DataFrame({"ts": [110.0, 130.0, 150.0, 155.0]}), "labels": pd.DataFrame({"ts": [120.0, 140.0]}),
...           "hardcases": pd.DataFrame({"ts": [125.0]})}
>>> traffic_figures(frames, interval_s=60.0, now=160.0)
{'labels_per_min': 2.0, 'hard_cases_per_min': 1.0, 'hard_case_rate': 0.25}
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pandas as pd

from broadfast.core.settings import Settings

log = logging.getLogger(__name__)

# the registry's names of a version's validation figures → the report's column names
QUALITY_FIGURES = {"val_spearman": "val_spearman", "val_ndcg@10": "val_ndcg_at_10", "stream_spearman": "stream_spearman"}
LOOP_FIGURES = ("labels_per_min", "hard_cases_per_min", "hard_case_rate", *QUALITY_FIGURES.values())


def traffic_figures(frames: dict[str, pd.DataFrame], interval_s: float, now: float) -> dict[str, float]:
    """Labels and hard cases per minute over the last ``interval_s`` seconds, and hard cases per scored pair."""
    since = now - interval_s

    def count(name: str) -> int:
        frame = frames.get(name)
        return 0 if frame is None or frame.empty else int((frame["ts"] > since).sum())

    scored, labels, hard = count("scored"), count("labels"), count("hardcases")
    out = {"labels_per_min": labels * 60.0 / interval_s, "hard_cases_per_min": hard * 60.0 / interval_s}
    if scored:
        out["hard_case_rate"] = hard / scored
    return out


def served_quality(settings: Settings, version: str) -> dict[str, float]:
    """The serving version's validation figures from its registry manifest (empty when it has none)."""
    from broadfast.model.registry import Registry

    try:
        metrics = Registry(settings).show(version).metrics or {}
    except Exception as exc:  # noqa: BLE001 - a version the registry cannot show has no figures to plot
        log.warning("no validation figures for %s: %s", version, exc)
        return {}
    return {column: float(metrics[name]) for name, column in QUALITY_FIGURES.items() if isinstance(metrics.get(name), (int, float)) and math.isfinite(metrics[name])}


def loop_report(figures: dict[str, float], version: str) -> Any:
    """The figures as an Evidently snapshot (one ``MeanValue`` per figure), tagged ``loop``."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import MeanValue

    frame = pd.DataFrame([{k: v for k, v in figures.items() if math.isfinite(v)}])
    return Report([MeanValue(column=c, tests=[]) for c in frame.columns], metadata={"model_version": version}, tags=["loop"]).run(
        Dataset.from_pandas(frame, data_definition=DataDefinition(numerical_columns=list(frame.columns))), None,
        name=f"loop {version}: labels and hard cases per minute, the serving version's validation quality",
    )
