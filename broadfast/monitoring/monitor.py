"""The monitor: every ``monitor_interval_s`` a drift report and the A/B comparison.

Each round works on the rolling :class:`~broadfast.monitoring.traffic.TrafficWindow` that the
monitor's consumer group keeps filling (dead-lettering what does not validate):

1. **drift** of the newest ``monitor_current_rows`` scored pairs — a window of one size every
   round, so its noise does not change with the run's length and a shift fills it within a
   round or two:

   - the *input* columns (query and title lengths, overlap, query frequency, stream
     counters) against the traffic's reference: the ``--reference`` file or
     ``BROADFAST_MONITOR_REFERENCE`` when given, else the first window the monitor saw
     (kept across model versions: a swap changes the scores, not the traffic), grown to the
     current window's size;
   - the *model* columns (score, predicted grade, label agreement, hard cases) of the serving
     version's rows against that version's own reference — its first rows, stored when it
     first serves — so a model swap is never reported as data drift.

   A drifted round alone is noted; ``drift_alert_rounds`` drifted rounds in a row raise an
   ``Alert(kind="drift")`` (choice measured in ``benchmarks/drift_alarms.py``).
2. **A/B**, when an experiment runs (:mod:`broadfast.core.experiments`): the comparison of
   :mod:`broadfast.monitoring.ab`. A tripped guardrail raises ``Alert(kind="guardrail",
   severity="critical")`` and, with ``auto_rollback``, rolls the experiment back; a
   significant win raises ``Alert(kind="ab_promote", severity="info")`` (promotion
   stays an operator's decision).

Every round writes its files under ``<home>/monitoring/rounds/<time>/`` and saves its
Evidently snapshots into the workspace.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from broadfast.core.settings import Settings
from broadfast.monitoring.ab import compare
from broadfast.monitoring.drift import drift_report, write_report
from broadfast.monitoring.errors import WindowError
from broadfast.monitoring.loop import loop_report, served_quality, traffic_figures
from broadfast.monitoring.traffic import TOPICS, TrafficWindow
from broadfast.monitoring.window import MODEL_COLUMNS, serving_version, window_from_traffic
from broadfast.monitoring.workspace import (
    AB_PROJECT,
    DRIFT_PROJECT,
    TRAFFIC_REFERENCE,
    load_reference,
    save_reference,
    save_snapshot,
)
from broadfast.core.events import Alert, finite_or_null, now

log = logging.getLogger(__name__)

CAUGHT_UP_S = 5.0  # a consumed event this recent means the monitor has caught up with the stream: a due round runs
MIN_REFERENCE_ROWS = 300  # rows a first window needs to become a reference
REFERENCE_COLUMNS = {"request_id", "ts", "query", "title", "score", "label", "hard_case", "model_version"}  # + p_*, f_*


def compare_traffic(settings: Settings, reference: pd.DataFrame, current: pd.DataFrame, version: str, own: pd.DataFrame | None, *, name: str | None = None, metadata: dict[str, Any] | None = None) -> Any:
    """Drift of a traffic window (:func:`broadfast.monitoring.window.window_from_traffic`): its input columns
    against ``reference``; the model columns of ``version``'s rows against ``own``, that version's own
    reference (untested, with the reason, while it has none)."""
    mine = current[current["model_version"] == version] if "model_version" in current.columns else current
    meta = {"model_version": version, "model_reference": "none yet" if own is None else f"first {len(own)} rows of {version}"} | (metadata or {})
    if own is None:  # its model columns are not tested, but their current means are still reported (the dashboard plots them)
        why = f"model version {version} has no reference window yet (its first rows become one): a version is compared only with itself"
        return drift_report(reference, current, settings, model_reference=mine, model_current=mine, untested={c: why for c in MODEL_COLUMNS}, name=name, metadata=meta)
    return drift_report(reference, current, settings, model_reference=own, model_current=mine, name=name, metadata=meta)


def caught_up(event: Any) -> bool:
    """Whether ``event`` is recent (within :data:`CAUGHT_UP_S`): the consumer has no backlog worth waiting for."""
    ts = getattr(event, "ts", None)
    return ts is not None and time.time() - float(ts) <= CAUGHT_UP_S


@dataclass
class RoundResult:
    """What one monitoring round found and did."""

    out_dir: Path
    drift: dict[str, Any] | None = None
    ab: dict[str, Any] | None = None
    loop: dict[str, Any] | None = None  # labels and hard cases per minute, the serving version's validation figures (broadfast.monitoring.loop)
    alerts: list[Alert] = field(default_factory=list)
    rolled_back: bool = False
    notes: list[str] = field(default_factory=list)


class Monitor:
    """Runs monitoring rounds; publishes alerts with ``bus`` and acts on ``store``.

    ``bus``: an :class:`~broadfast.core.bus.EventBus` (None: alerts are only returned);
    ``store``: an :class:`~broadfast.core.experiments.ExperimentStore` (None: no A/B);
    ``reference``: a window (see :mod:`broadfast.monitoring.window`) that overrides the stored ones.
    """

    def __init__(self, settings: Settings, *, bus: Any | None = None, store: Any | None = None, reference: pd.DataFrame | None = None, out_root: Path | None = None) -> None:
        self.settings = settings
        self.bus = bus
        self.store = store
        self.reference = reference
        self.out_root = out_root or settings.home / "monitoring" / "rounds"
        self.streak = 0  # drifted rounds in a row

    # -- one round ---------------------------------------------------------------------------
    def run_round(self, window: TrafficWindow) -> RoundResult:
        out = self.out_root / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"
        out.mkdir(parents=True, exist_ok=True)
        result = RoundResult(out)
        taken = time.time()  # the window's time: the loop's per-minute counts end here
        frames = window.frames()
        self._drift(frames, result)
        self._loop(frames, result, taken)
        self._ab(frames, result)
        for alert in result.alerts:
            if self.bus is not None:
                self.bus.publish(alert)
        if self.bus is not None and result.alerts:
            self.bus.flush()
        (out / "round.json").write_text(
            json.dumps({"drift": result.drift, "loop": result.loop, "ab": result.ab, "alerts": [a.model_dump() for a in result.alerts], "rolled_back": result.rolled_back, "notes": result.notes}, indent=2, default=str)
        )
        return result

    def _reference(self, key: str, rows: pd.DataFrame, result: RoundResult, what: str) -> pd.DataFrame | None:
        """The stored reference ``key``: the first rows seen (arrival order), grown round by round
        until it holds ``monitor_current_rows`` — as many as the current window, so both carry the
        same noise. Returns it as it was *before* this round's rows joined (None while it is first
        taken): a window is never compared with itself."""
        target = self.settings.monitoring.monitor_current_rows
        stored = load_reference(self.settings, key)
        if stored is not None and (len(stored) >= target or "ts" not in stored.columns):
            return stored
        newer = rows if stored is None else rows[rows["ts"] > stored["ts"].max()]
        grown = (newer if stored is None else pd.concat([stored, newer], ignore_index=True)).head(target)
        if len(grown) < MIN_REFERENCE_ROWS:
            result.notes.append(f"collecting a reference for {what}: {len(grown)} of {MIN_REFERENCE_ROWS} rows so far")
            return None
        if stored is None or len(grown) > len(stored):
            keep = [c for c in grown.columns if c in REFERENCE_COLUMNS or c.startswith(("p_", "f_"))]
            save_reference(self.settings, key, grown[keep])
            result.notes.append(f"reference of {what}: {len(grown)} of {target} rows" + (" (tested from the next round)" if stored is None else ""))
        return stored

    def _drift(self, frames: dict[str, pd.DataFrame], result: RoundResult) -> None:
        scored = frames["scored"]
        if scored.empty:
            result.notes.append("no scored traffic in the window: no drift report")
            return
        version, live = serving_version(scored)
        window = window_from_traffic(live, frames["labels"], frames["hardcases"] if len(frames["hardcases"]) else None)
        current = window.tail(self.settings.monitoring.monitor_current_rows)
        reference = self.reference if self.reference is not None else self._reference(TRAFFIC_REFERENCE, window, result, "the traffic (input columns)")
        own = self._reference(version, window[window["model_version"] == version], result, f"model version {version} (score, grade, agreement and hard-case columns)")
        if reference is None:
            return
        try:
            report = compare_traffic(self.settings, reference, current, version, own, name=f"drift {version} {time.strftime('%Y-%m-%d %H:%M:%S')}")
        except WindowError as exc:
            result.notes.append(f"no drift report: {exc}")
            return
        detected = bool(report.summary["drift_detected"])
        self.streak = self.streak + 1 if detected else 0
        alert = detected and self.streak >= self.settings.monitoring.drift_alert_rounds
        report.summary |= {"rounds_in_a_row": self.streak, "alert": alert, "alert_after_rounds": self.settings.monitoring.drift_alert_rounds}
        write_report(report, result.out_dir / "drift")
        report.summary["snapshot_id"] = save_snapshot(self.settings, DRIFT_PROJECT, report.snapshot)
        result.drift = report.summary
        if detected and not alert:
            result.notes.append(f"drift in this round ({', '.join(report.summary['drifted_columns'])}): {self.streak} of {self.settings.monitoring.drift_alert_rounds} rounds in a row needed for an alert")
        if alert:
            result.alerts.append(
                Alert(
                    kind="drift",
                    severity="warning",
                    details=finite_or_null({
                        "model_version": version,
                        "drifted_columns": report.summary["drifted_columns"],
                        "drifted_share": report.summary["drifted_share"],
                        "rounds_in_a_row": self.streak,
                        "report": str(result.out_dir / "drift" / "drift.html"),
                    }),
                    ts=now(),
                )
            )

    def _loop(self, frames: dict[str, pd.DataFrame], result: RoundResult, taken: float) -> None:
        """The loop's figures of this round (:mod:`broadfast.monitoring.loop`), saved for the drift project's dashboard.
        A failure here is a note: it must not cost the round its drift alert or its A/B guardrail."""
        if frames["scored"].empty:
            return
        try:
            version, _ = serving_version(frames["scored"])
            figures = traffic_figures(frames, self.settings.monitoring.monitor_interval_s, taken) | served_quality(self.settings, version)
            snapshot_id = save_snapshot(self.settings, DRIFT_PROJECT, loop_report(figures, version))
        except Exception as exc:  # noqa: BLE001 - Evidently and the workspace raise many types
            log.warning("loop figures of this round failed: %s", exc)
            result.notes.append(f"no loop figures this round: {type(exc).__name__}: {exc}")
            return
        result.loop = {"model_version": version, **{k: round(v, 6) for k, v in figures.items()}, "snapshot_id": snapshot_id}

    def _ab(self, frames: dict[str, pd.DataFrame], result: RoundResult) -> None:
        if self.store is None:
            return
        exp = self.store.running()
        if exp is None:
            return
        ab = compare(exp, frames["scored"], frames["clicks"], self.settings, labels=frames["labels"], counts=self.store.counts(exp.experiment_id))
        summary = ab.to_dict()
        ab_dir = result.out_dir / "ab"
        ab_dir.mkdir(parents=True, exist_ok=True)
        for name, snap in ab.snapshots.items():
            snap.save_html(str(ab_dir / f"{name}.html"))
            snap.save_json(str(ab_dir / f"{name}.json"))
            save_snapshot(self.settings, AB_PROJECT, snap)
        details = {"experiment_id": exp.experiment_id, "champion": exp.champion, "challenger": exp.challenger, "verdict": ab.verdict, "reason": ab.reason}
        if ab.verdict == "roll_back":
            if self.settings.monitoring.auto_rollback:
                from broadfast.core.experiments import ExperimentError

                try:
                    self.store.rollback(reason=ab.reason)
                    result.rolled_back = True
                except ExperimentError as exc:  # ended meanwhile (an operator was faster)
                    result.notes.append(f"rollback not needed: {exc}")
            details["rolled_back"] = result.rolled_back
            result.alerts.append(Alert(kind="guardrail", severity="critical", details=finite_or_null(details | {"guardrails": ab.guardrails}), ts=now()))
        elif ab.verdict == "promote":
            result.alerts.append(Alert(kind="ab_promote", severity="info", details=finite_or_null(details), ts=now()))
        summary["rolled_back"] = result.rolled_back
        (ab_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        result.ab = summary

    # -- the loop ----------------------------------------------------------------------------
    def run(self, *, stop: threading.Event | None = None, rounds: int | None = None, consumer: Any | None = None, deadletters: Any | None = None) -> list[RoundResult]:
        """Consume the monitored topics and run a round every ``monitor_interval_s``.

        Stops after ``rounds`` rounds (None: until ``stop`` is set). A round that fails is
        logged and counted, and the loop goes on. Returns the results of the rounds that
        completed (the last 100).
        """
        from broadfast.core.bus import commit, consume, make_consumer
        from broadfast.core.deadletter import DeadLetters

        consumer = consumer or make_consumer(self.settings, TOPICS, "broadfast-monitor")
        deadletters = deadletters or DeadLetters(self.settings, self.bus, "monitor")
        window = TrafficWindow(self.settings.monitoring.monitor_window_events)
        results: list[RoundResult] = []
        attempts = 0
        next_round = time.monotonic() + self.settings.monitoring.monitor_interval_s
        try:
            for delivery in consume(self.settings, consumer, deadletters, poll_timeout_ms=500):
                if delivery is not None:
                    window.add(delivery.event)
                if stop is not None and stop.is_set():
                    break
                t = time.monotonic()
                # A round runs once due and caught up: an idle poll, or an event from the last
                # CAUGHT_UP_S seconds (traffic that never pauses never gives an idle poll; waiting
                # for one made every round a whole interval late) — else a whole interval late.
                if t < next_round or (delivery is not None and not caught_up(delivery.event) and t < next_round + self.settings.monitoring.monitor_interval_s):
                    continue
                if not len(window) and not len(window.clicks):
                    log.info("monitor: no traffic yet on %s; next round in %g s", self.settings.topic("scored"), self.settings.monitoring.monitor_interval_s)
                    next_round = t + self.settings.monitoring.monitor_interval_s
                    continue
                commit(consumer)
                attempts += 1
                try:
                    result = self.run_round(window)
                except Exception:
                    log.exception("monitor round failed; the next one runs in %g s", self.settings.monitoring.monitor_interval_s)
                else:
                    results = (results + [result])[-100:]
                    log.info(
                        "monitor round: %d scored events, drift %s, A/B %s, %d alert(s) → %s",
                        len(window), "n/a" if result.drift is None else result.drift["drift_detected"],
                        "n/a" if result.ab is None else result.ab["verdict"], len(result.alerts), result.out_dir,
                    )
                next_round = time.monotonic() + self.settings.monitoring.monitor_interval_s
                if rounds is not None and attempts >= rounds:
                    break
        finally:
            consumer.close()
        return results
