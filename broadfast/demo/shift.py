"""The demo's shift scenario: traffic switches from one data set to another part-way through a run.

``broadfast demo --shift-to FILE --shift-after SECONDS`` replays ``--data`` (Home Depot by
default) and then ``FILE`` (e.g. CrowdFlower): new queries, new products, longer ad texts. It is a
simulation of a change in traffic, named as one wherever a user sees it. For the run:

* the oracle answers from both files (``BROADFAST_TEACHER_ORACLE_DATA``, comma-separated);
* the trainer's fixed validation slice pools both files' held-out queries (``train online
  --val-data A --val-data B``), so the gate judges on old and new traffic alike;
* the live view marks the shift, the first drift alert after it (its delay and the columns it
  names), and the trainer's figures on the newest held-out traffic labels;
* at the end, the versions that served at the shift, first after it and last are measured on the
  new data set's held-out queries (never trained on), all on the same pairs, with the PyTorch
  student (what the int8 backend is checked against): the summary's ``shift`` key.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broadfast.core.settings import Settings
from broadfast.demo.report import Tally

log = logging.getLogger(__name__)

NEW_TRAFFIC_PAIRS = 2000  # held-out pairs of the new data set the end-of-run figures are measured on (whole queries)
# Ads per request in a shift run, both before and after: CrowdFlower has ~39 products a query (Home Depot ~6), so
# 50-ad requests would score six times the pairs after the shift and the 2-core machine would measure its own overload.
SHIFT_MAX_ADS = 10


@dataclass
class Shift:
    """What the demo's traffic does: ``source`` until ``after_s`` seconds into the replay, then ``target``."""

    source: Path
    target: Path
    after_s: float
    ts: float | None = None  # wall-clock time of the switch, once it happened

    def mark(self, ts: float) -> None:
        self.ts = ts
        log.info("traffic shifted from %s to %s (a simulated shift)", self.source, self.target)

    def label(self) -> str:
        return f"{self.source.parent.name}/{self.source.name} → {self.target.parent.name}/{self.target.name}"


def first_drift_alert(tally: Tally, since: float, interval_s: float, need: int) -> Any | None:
    """The shift's drift alert: the first one whose streak holds at least ``need`` (the monitor's
    ``drift_alert_rounds``) drifted rounds after ``since`` (wall-clock seconds), i.e. the first alert the
    rounds after the shift would have raised by themselves. A streak that began before the shift (a noisy
    round just before it) does not hide the alert the shift raised. ``interval_s``: the monitor's rounds."""

    def rounds_after(alert: Any) -> int:
        n = int((alert.details or {}).get("rounds_in_a_row") or 1)
        return sum(alert.ts - k * interval_s > since for k in range(n))

    with tally.lock:
        return next((a for a in sorted(tally.alerts, key=lambda a: a.ts) if a.kind == "drift" and a.ts > since and rounds_after(a) >= need), None)


def shift_line(shift: Shift, tally: Tally, started_wall: float, settings: Settings) -> str:
    """The live view's line: when the traffic shifted, and the drift alert that followed."""
    if shift.ts is None:
        return f"{shift.label()} at {shift.after_s:.0f} s (simulated shift; not yet)"
    line = f"{shift.label()} at {shift.ts - started_wall:.0f} s (simulated shift)"
    alert = first_drift_alert(tally, shift.ts, settings.monitoring.monitor_interval_s, settings.monitoring.drift_alert_rounds)
    if alert is None:
        return line + f"; no drift alert yet ({time.time() - shift.ts:.0f} s since)"
    columns = ", ".join((alert.details or {}).get("drifted_columns") or []) or "?"
    return line + f"; drift alert {alert.ts - shift.ts:.0f} s after it ({columns})"


def served_at(tally: Tally, ts: float) -> tuple[str | None, str | None, str | None]:
    """(version serving at ``ts``, first version served after it, last version served)."""
    with tally.lock:
        order = sorted(tally.version_first_ts.items(), key=lambda kv: kv[1])
    before = [v for v, first in order if first <= ts]
    after = [v for v, first in order if first > ts]
    return (before[-1] if before else None), (after[0] if after else None), (order[-1][0] if order else None)


def shift_summary(settings: Settings, shift: Shift, tally: Tally) -> dict[str, Any]:
    """The summary's ``shift`` key: when, the drift alert's delay and columns, and quality on the new traffic."""
    out: dict[str, Any] = {"from": str(shift.source), "to": str(shift.target), "after_s": shift.after_s, "ts": shift.ts, "simulated": True}
    if shift.ts is None:
        return out | {"note": "the run ended before the shift"}
    alert = first_drift_alert(tally, shift.ts, settings.monitoring.monitor_interval_s, settings.monitoring.drift_alert_rounds)
    out["drift_alert"] = None if alert is None else {
        "delay_s": round(alert.ts - shift.ts, 1), "drifted_columns": (alert.details or {}).get("drifted_columns"),
        "rounds_in_a_row": (alert.details or {}).get("rounds_in_a_row"), "monitor_interval_s": settings.monitoring.monitor_interval_s,
    }  # fmt: skip
    at_shift, first_after, last = served_at(tally, shift.ts)
    try:
        q = measure_versions(settings, shift.target, {"at_shift": at_shift, "first_after_shift": first_after, "last": last})
    except Exception as exc:  # noqa: BLE001 - the rest of the summary must survive a version that cannot be measured
        log.error("could not measure the served versions on the new traffic: %s", exc)
        return out | {"quality_on_new_traffic": None, "error": f"{type(exc).__name__}: {exc}"}
    out["quality_on_new_traffic"] = q

    def gain(a: str, b: str) -> float | None:
        if not (q.get(a) and q.get(b)) or q[a]["spearman"] is None or q[b]["spearman"] is None:
            return None
        return round(q[b]["spearman"] - q[a]["spearman"], 4)

    out["spearman_gain"], out["spearman_gain_since_first_after"] = gain("at_shift", "last"), gain("first_after_shift", "last")
    return out


def measure_versions(settings: Settings, data: Path, versions: dict[str, str | None]) -> dict[str, Any]:
    """Validation figures of registry ``versions`` on ``data``'s held-out queries (the same pairs for all)."""
    from broadfast.core.datasets import load_pairs
    from broadfast.training.gate import Gate
    from broadfast.training.online import validation_slice
    from broadfast.model.registry import Registry

    val = validation_slice(load_pairs(data, require_grade=True), settings.training.online_val_share, NEW_TRAFFIC_PAIRS)
    gate, registry = Gate(val), Registry(settings)
    out: dict[str, Any] = {"pairs": len(val), "queries": int(val["query"].nunique())}
    measured: dict[str, dict[str, Any]] = {}
    for role, version in versions.items():
        if version is None:
            out[role] = None
            continue
        if version not in measured:
            student, _ = registry.load(version, device="cpu")
            m = gate.measure(student).metrics
            measured[version] = {"version": version, **{k: round(float(m[k]), 4) if math.isfinite(m.get(k, math.nan)) else None for k in ("spearman", "ndcg@10")}}
        out[role] = measured[version]
    return out


def shift_lines(s: dict[str, Any]) -> list[str]:
    """The summary's lines about the shift."""
    if s.get("ts") is None:
        return [f"traffic shift to {s['to']}: {s.get('note', 'did not happen')}"]
    alert = s.get("drift_alert")
    lines = [f"traffic shift (simulated) {Path(s['from']).parent.name} → {Path(s['to']).parent.name} after {s['after_s']:.0f} s: "
             + ("no drift alert after it" if alert is None else f"drift alert {alert['delay_s']:.0f} s later (monitor round every {alert['monitor_interval_s']:.0f} s), columns {', '.join(alert['drifted_columns'] or [])}")]  # fmt: skip
    q = s.get("quality_on_new_traffic") or {}

    def fig(role: str) -> str:
        v = q.get(role)
        if not v:
            return "—"
        return f"{v['version']} " + " / ".join("—" if v[k] is None else f"{v[k]:.3f}" for k in ("spearman", "ndcg@10"))

    lines.append(f"quality on the new traffic ({q.get('pairs', 0)} held-out pairs of {q.get('queries', 0)} queries, Spearman / NDCG@10): "
                 f"at the shift {fig('at_shift')} · first after {fig('first_after_shift')} · last {fig('last')}"
                 + (f" — {s['spearman_gain']:+.3f} Spearman since the shift" if s.get("spearman_gain") is not None else ""))  # fmt: skip
    return lines
