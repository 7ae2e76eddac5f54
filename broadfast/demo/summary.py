"""The demo's summary: what ran, what it measured, where its reports and logs are (the ``--summary`` JSON)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from broadfast.core.settings import Settings
from broadfast.demo.report import Tally, freshness, percentile, quality_summary
from broadfast.demo.shift import Shift, shift_summary
from broadfast.demo.supervisor import Component, run_step

log = logging.getLogger(__name__)


def drift_reports(home: Path, env: dict[str, str]) -> list[str]:
    """Write a last drift report of the run (``broadfast drift``) and list every drift report of it."""
    out = home / "drift" / time.strftime("%Y%m%d-%H%M%S")
    proc = run_step(env, "drift", "--out", str(out))
    if proc.returncode != 0:
        log.warning("the drift report failed (exit %d): %s", proc.returncode, proc.stderr[-1500:])
    reports = sorted(str(p) for p in (home / "drift").rglob("*.html")) if (home / "drift").exists() else []
    monitor_dir = home / "monitoring"
    if monitor_dir.exists():
        reports += sorted(str(p) for p in monitor_dir.rglob("*.html"))
    return reports


def summarise(
    tally: Tally, settings: Settings, *, duration_s: float, teacher: str, replay_stats: Any, backend: dict[str, Any] | None, budget: dict[str, Any] | None,
    reports: list[str], components: Sequence[Component], shift: Shift | None, logs: Path, out: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The summary of a finished demo (written as JSON to ``out`` when given); a component that died is logged with its log's end."""
    from broadfast.training.online import is_held_out

    died = [c.name for c in components if not c.alive]
    for component in components:
        if component.name in died:
            log.error("%s exited during the demo (%s); its log ends:\n%s", component.name, component.status(), component.tail(1500))
    stats = replay_stats
    fresh = freshness(tally, lambda q: is_held_out(q, settings.training.online_val_share))
    client_lat = list(stats.latencies_ms) if stats is not None else []
    summary = {
        "duration_s": duration_s,
        "teacher": teacher,
        "requests": stats.requests if stats else 0,
        "failed_requests": stats.scoring_failed if stats else 0,
        "events_lost": stats.events_lost if stats else 0,  # the frontend's requests and clicks the broker never acknowledged
        "pairs_scored": tally.counts.get("scored", 0),
        "hard_cases": tally.counts.get("hardcases", 0),
        "labels": tally.counts.get("labels", 0),
        "labels_by_perspectives": {str(k): v for k, v in sorted(tally.perspectives.items())},
        "models_published": len(tally.models),
        "versions_served": list(tally.version_first_ts),
        "swaps": max(0, len(tally.version_first_ts) - 1),
        "serving_backend": backend,  # the champion's inference backend at the end (BROADFAST_SERVE_BACKEND)
        "serving_p99_ms": percentile(tally.server_latency_ms, 99),
        "serving_p50_ms": percentile(tally.server_latency_ms, 50),
        "client_p99_ms": percentile(client_lat, 99),
        "teacher_student_agreement": float(np.mean(tally.agreement)) if tally.agreement else None,
        "freshness_s": {
            "p50": percentile([f for f, _ in fresh], 50), "p90": percentile([f for f, _ in fresh], 90), "n": len(fresh),
            "to_label_p50": percentile([w for _, w in fresh], 50), "label_to_served_p50": percentile([f - w for f, w in fresh], 50),
        },  # fmt: skip
        "dead_letters": tally.counts.get("deadletter", 0),
        "alerts": [a.kind for a in tally.alerts],
        "quality": quality_summary(tally, teacher),
        "labelling": budget,
        "drift_reports": reports,
        **({"shift": shift_summary(settings, shift, tally)} if shift is not None else {}),
        "components": {c.name: c.status() for c in components},
        "components_died": died,
        "logs": str(logs),
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2))
    return summary
