"""Drift reports: an Evidently ``DataDriftPreset`` over the tested columns of two windows.

The reference window is what the serving model was trained and validated on (a file of
pairs, or the traffic's stored first window); the current one is recent traffic or a
second file. The *model* columns (score, predicted grade, label agreement, hard cases) can
have a reference of their own — ``model_reference`` against ``model_current``: the serving
version's own first window against that version's recent rows — so that a new version is
compared with itself, not with its predecessor's scores; the *input* columns always compare
the traffic. Every part is sampled to ``monitor_sample_rows`` rows (see
:func:`broadfast.monitoring.window.drift_frame`): Evidently's drift cost grows with the rows, and its
statistical tests do not need millions of them. Missing values are left out per column, so
one report tests both kinds.

A column drifts when its distance to the reference reaches a threshold: normed Wasserstein
for numerical columns (``drift_num_threshold``), Jensen–Shannon for categorical ones
(``drift_cat_threshold``) — at every window size, where Evidently's defaults switch to
p-values below 1,000 rows. The window drifts when the share of drifted columns reaches
``drift_share``.

The report also holds the current window's mean of the tested model columns in
:data:`MEAN_COLUMNS` (score, label agreement, hard-case rate; Evidently ``MeanValue``, no
tests): the figures the drift dashboard plots round by round (:mod:`broadfast.monitoring.dashboards`).

>>> import pandas as pd
>>> from broadfast.core.settings import Settings
>>> ref = pd.DataFrame({"query": ["a b"] * 50 + ["c"] * 50, "title": ["a x"] * 100})
>>> result = drift_report(ref, ref, Settings(monitor_sample_rows=100))
>>> result.summary["drift_detected"], result.summary["drifted_columns"]
(False, [])
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from broadfast.core.settings import Settings
from broadfast.monitoring.errors import WindowError
from broadfast.monitoring.window import COLUMNS, FREQ_ROWS, MODEL_COLUMNS, drift_frame, window_stats

log = logging.getLogger(__name__)

# Distances, not p-values, at every window size: the pairs of one request share its query, so a
# test that takes them as independent samples finds "significant" drift in the noise of which
# queries came; a distance has a threshold on the size of the change instead.
NUM_METHOD, CAT_METHOD = "wasserstein", "jensenshannon"
MIN_NON_NULL = 30  # a column is tested only when both windows have this many values
VALUE_DRIFT = "evidently:metric_v2:ValueDrift"
MEAN_COLUMNS = ("score", "label_agreement", "hard_case")  # their current means go into the report as MeanValue


@dataclass
class DriftResult:
    """An Evidently snapshot of the drift report and its summary (JSON-ready)."""

    snapshot: Any
    summary: dict[str, Any]


def _column_kinds(ref: pd.DataFrame, cur: pd.DataFrame, untested: dict[str, str]) -> tuple[list[str], list[str], dict[str, str]]:
    known = {c.name: c.kind for c in COLUMNS}
    numerical, categorical, skipped = [], [], {}
    names = [c.name for c in COLUMNS] + sorted(c for c in set(ref.columns) | set(cur.columns) if c.startswith("f_"))
    for name in names:
        if name in untested:
            skipped[name] = untested[name]
            continue
        if name not in ref.columns or name not in cur.columns:
            where = "either window" if name not in ref.columns and name not in cur.columns else ("the reference" if name not in ref.columns else "the current window")
            skipped[name] = f"not in {where}"
            continue
        n_ref, n_cur = int(ref[name].notna().sum()), int(cur[name].notna().sum())
        if min(n_ref, n_cur) < MIN_NON_NULL:
            skipped[name] = f"too few values ({n_ref} reference, {n_cur} current; need {MIN_NON_NULL})"
            continue
        (categorical if known.get(name, "num") == "cat" else numerical).append(name)
    return numerical, categorical, skipped


def drift_report(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    settings: Settings,
    *,
    model_reference: pd.DataFrame | None = None,
    model_current: pd.DataFrame | None = None,
    untested: dict[str, str] | None = None,
    name: str | None = None,
    metadata: dict[str, Any] | None = None,
    seed: int = 0,
) -> DriftResult:
    """Compare two windows (see :mod:`broadfast.monitoring.window`); returns the snapshot and summary.

    ``model_reference`` / ``model_current``: windows for the model columns (both or neither);
    ``untested``: columns left out on purpose, with the reason the summary gives.
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import MeanValue
    from evidently.presets import DataDriftPreset

    if (model_reference is None) != (model_current is None):
        raise WindowError("model columns need both a reference and a current window, or neither")
    t0 = time.perf_counter()
    freq_rows = min(len(reference), len(current), FREQ_ROWS)  # one sample size for both windows' query frequency
    ref = drift_frame(reference, sample_rows=settings.monitoring.monitor_sample_rows, freq_rows=freq_rows, seed=seed)
    cur = drift_frame(current, sample_rows=settings.monitoring.monitor_sample_rows, freq_rows=freq_rows, seed=seed + 1)
    if model_reference is not None and model_current is not None:
        ref, cur = _with_model_columns(ref, model_reference, settings, seed + 2), _with_model_columns(cur, model_current, settings, seed + 3)
    numerical, categorical, skipped = _column_kinds(ref, cur, untested or {})
    tested = numerical + categorical
    if not tested:
        raise WindowError("no column can be compared between the two windows")
    # an untested model column still gets its current mean (a version too new for its own reference still
    # has a mean score, agreement and hard-case rate to plot); only the preset's columns are tested for drift
    plotted = [c for c in MEAN_COLUMNS if c not in tested and c in cur.columns and c in ref.columns and cur[c].notna().any() and ref[c].notna().any()]
    ref, cur = ref[tested + plotted], cur[tested + plotted]
    definition = DataDefinition(numerical_columns=numerical + plotted, categorical_columns=categorical)
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    preset = DataDriftPreset(
        columns=tested, drift_share=settings.monitoring.drift_share,
        num_method=NUM_METHOD, cat_method=CAT_METHOD, num_threshold=settings.monitoring.drift_num_threshold, cat_threshold=settings.monitoring.drift_cat_threshold,
    )  # fmt: skip
    means = [MeanValue(column=c, tests=[]) for c in MEAN_COLUMNS if c in numerical or c in plotted]
    report = Report([preset, *means], include_tests=True, metadata=meta, tags=["drift"])
    snapshot = report.run(
        Dataset.from_pandas(cur, data_definition=definition),
        Dataset.from_pandas(ref, data_definition=definition),
        name=name or f"drift {time.strftime('%Y-%m-%d %H:%M:%S')}",
    )
    columns = _column_results(snapshot.dict())
    drifted = [c for c in tested if columns.get(c, {}).get("drifted")]
    share = len(drifted) / len(tested)
    summary = {
        "drift_detected": share >= settings.monitoring.drift_share,
        "drifted_columns": drifted,
        "drifted_share": round(share, 6),
        "drift_share_threshold": settings.monitoring.drift_share,
        "tested_columns": tested,
        "columns": columns,
        "skipped_columns": skipped,
        "reference": window_stats(ref, len(reference)),
        "current": window_stats(cur, len(current)),
        "metadata": meta,
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }
    log.info(
        "drift report: %d/%d columns drifted (%s)%s in %.2f s",
        len(drifted), len(tested), ", ".join(drifted) or "none", " → DRIFT" if summary["drift_detected"] else "", summary["elapsed_s"],
    )
    return DriftResult(snapshot, summary)


def _with_model_columns(inputs: pd.DataFrame, window: pd.DataFrame, settings: Settings, seed: int) -> pd.DataFrame:
    """``inputs``' input columns stacked with ``window``'s model columns (each part's other columns missing)."""
    keep = [c for c in inputs.columns if c not in MODEL_COLUMNS]
    if window.empty:
        return inputs[keep]
    model = drift_frame(window, sample_rows=settings.monitoring.monitor_sample_rows, seed=seed)
    return pd.concat([inputs[keep], model[[c for c in model.columns if c in MODEL_COLUMNS]]], ignore_index=True)


def _column_results(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-column method, score, threshold and verdict from the report's drift tests."""
    values = {m["id"]: m.get("value") for m in report.get("metrics", [])}
    out: dict[str, dict[str, Any]] = {}
    for test in report.get("tests", []):
        cfg = test.get("metric_config", {})
        params = cfg.get("params", {})
        if params.get("type") != VALUE_DRIFT:
            continue
        score = values.get(cfg.get("metric_id"))
        out[params["column"]] = {
            "method": params.get("method"),
            "threshold": params.get("threshold"),
            "score": float(score) if isinstance(score, (int, float)) else None,
            "drifted": test.get("status") == "FAIL",
        }
    return out


def write_report(result: DriftResult, out: Path, *, basename: str = "drift") -> dict[str, Path]:
    """Write ``<basename>.html``, ``<basename>.json`` (Evidently) and ``summary.json`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"html": out / f"{basename}.html", "json": out / f"{basename}.json", "summary": out / "summary.json"}
    result.snapshot.save_html(str(paths["html"]))
    result.snapshot.save_json(str(paths["json"]))
    paths["summary"].write_text(json.dumps(result.summary, indent=2, default=str))
    return paths
