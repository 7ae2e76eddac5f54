"""Command-line commands of broadfast/monitoring/ (registered on the `broadfast` group in broadfast/cli/main.py).

Keep imports of heavy libraries inside the command functions so `broadfast --help` stays fast.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import click

from broadfast.core.logs import command_settings
from broadfast.core.settings import Settings

log = logging.getLogger(__name__)


def load_window(path: Path, model: Path | None, settings: Settings) -> Any:
    """A window from a parquet file of pairs, scored with ``model`` when it carries no scores."""
    from broadfast.monitoring.window import PROB_COLUMNS, window_from_pairs
    from broadfast.core.datasets import load_pairs

    df = load_pairs(path)
    has_scores = all(c in df.columns for c in PROB_COLUMNS)
    if not has_scores and model is not None:
        import torch

        from broadfast.serving.predict import predict_frame
        from broadfast.model.student import load_student

        torch.set_num_threads(settings.torch_threads)
        log.info("scoring %s (%d pairs) with %s", path, len(df), model)
        df = predict_frame(load_student(model, "cpu"), df, progress=True)
    elif not has_scores:
        log.warning("%s carries no score / p_* columns and no --model was given: prediction drift is skipped for it", path)
    return window_from_pairs(df)


def _traffic_reference(settings: Settings) -> Any:
    from broadfast.monitoring.errors import MonitoringError
    from broadfast.monitoring.workspace import TRAFFIC_REFERENCE, load_reference

    stored = load_reference(settings, TRAFFIC_REFERENCE)
    if stored is None:
        raise MonitoringError(
            "no reference window for the traffic: pass --reference FILE, set BROADFAST_MONITOR_REFERENCE, "
            "or let `broadfast monitor` store the first window it sees"
        )
    return stored


@click.command()
@click.option("--reference", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None, help="Reference pairs (parquet) [BROADFAST_MONITOR_REFERENCE].")
@click.option("--current", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None, help="Current pairs (parquet); default: recent traffic from the broker.")
@click.option("--model", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None, help="Model folder that scores files carrying no score / p_* columns.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder for drift.html, drift.json and summary.json.")
@click.option("--sample-rows", type=int, default=None, help="Rows each window is sampled to [BROADFAST_MONITOR_SAMPLE_ROWS].")
@click.option("--fail-on-drift", is_flag=True, help="Exit with status 3 when drift is detected.")
def drift(reference: Path | None, current: Path | None, model: Path | None, out: Path, sample_rows: int | None, fail_on_drift: bool) -> None:
    """One Evidently drift report, from two files or from recent traffic.

    \b
    Files:   broadfast drift --reference ref.parquet --current cur.parquet [--model DIR] --out DIR
    Traffic: broadfast drift --out DIR   (relevance.scored + labels + hard cases of the serving
             version: inputs against --reference, BROADFAST_MONITOR_REFERENCE or the first window
             `broadfast monitor` stored; score and grade columns against the version's own first window)
    """
    from broadfast.monitoring.drift import drift_report, write_report
    from broadfast.monitoring.errors import MonitoringError
    from broadfast.monitoring.workspace import DRIFT_PROJECT, save_snapshot, workspace_path

    settings = command_settings(monitor_sample_rows=sample_rows)
    reference = reference or settings.monitoring.monitor_reference
    meta: dict[str, Any] = {}
    if current is not None:
        if reference is None:
            raise MonitoringError("--current needs a reference: pass --reference FILE (or set BROADFAST_MONITOR_REFERENCE)")
        cur_window = load_window(current, model, settings)
        meta["current"] = str(current)
    else:
        from broadfast.monitoring.traffic import read_recent
        from broadfast.monitoring.window import serving_version, window_from_traffic

        frames = read_recent(settings).frames()
        if frames["scored"].empty:
            raise MonitoringError(f"no scored traffic on {settings.topic('scored')} at {settings.kafka.kafka_bootstrap}")
        version, live = serving_version(frames["scored"])
        cur_window = window_from_traffic(live, frames["labels"], frames["hardcases"] if len(frames["hardcases"]) else None)
        meta["current"] = f"traffic: last {len(cur_window)} scored events of {settings.topic('scored')}"
    if reference is not None:
        ref_window = load_window(reference, model, settings)
        meta["reference"] = str(reference)
    else:
        ref_window = _traffic_reference(settings)
        meta["reference"] = "the traffic's first window (stored by `broadfast monitor`)"
    if current is None:
        from broadfast.monitoring.monitor import compare_traffic
        from broadfast.monitoring.workspace import load_reference

        result = compare_traffic(settings, ref_window, cur_window, version, load_reference(settings, version), metadata=meta)
    else:
        result = drift_report(ref_window, cur_window, settings, metadata=meta)
    paths = write_report(result, out)
    result.summary["snapshot_id"] = save_snapshot(settings, DRIFT_PROJECT, result.snapshot)
    paths["summary"].write_text(json.dumps(result.summary, indent=2, default=str))
    s = result.summary
    click.echo(
        f"drift {'DETECTED' if s['drift_detected'] else 'not detected'}: {len(s['drifted_columns'])}/{len(s['tested_columns'])} columns drifted "
        f"({', '.join(s['drifted_columns']) or 'none'}; share {s['drifted_share']:.2f}, threshold {s['drift_share_threshold']})"
    )
    for name, reason in s["skipped_columns"].items():
        click.echo(f"  not tested: {name} ({reason})")
    click.echo(f"wrote {paths['html']}, {paths['json']}, {paths['summary']}; snapshot {s['snapshot_id']} in {workspace_path(settings)}")
    if fail_on_drift and s["drift_detected"]:
        raise SystemExit(3)


@click.command()
@click.option("--interval", type=float, default=None, help="Seconds between rounds [BROADFAST_MONITOR_INTERVAL_S].")
@click.option("--rounds", type=int, default=None, help="Stop after this many rounds (default: run until interrupted).")
@click.option("--reference", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None, help="Reference pairs (parquet) [BROADFAST_MONITOR_REFERENCE].")
@click.option("--model", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None, help="Model folder that scores the reference if it carries no scores.")
@click.option("--auto-rollback/--no-auto-rollback", default=None, help="Roll back when a guardrail trips [BROADFAST_AUTO_ROLLBACK].")
def monitor(interval: float | None, rounds: int | None, reference: Path | None, model: Path | None, auto_rollback: bool | None) -> None:
    """Periodic drift reports, A/B comparisons and alerts (relevance.alerts)."""
    from broadfast.monitoring.monitor import Monitor
    from broadfast.core.experiments import ExperimentStore
    from broadfast.core.bus import EventBus

    settings = command_settings(monitor_interval_s=interval, auto_rollback=auto_rollback)
    reference = reference or settings.monitoring.monitor_reference
    ref_window = load_window(reference, model, settings) if reference is not None else None
    stop = threading.Event()
    with EventBus(settings) as bus:
        mon = Monitor(settings, bus=bus, store=ExperimentStore.from_settings(settings), reference=ref_window)
        click.echo(f"monitoring {settings.topic('scored')} every {settings.monitoring.monitor_interval_s:g} s (Ctrl-C stops); rounds under {mon.out_root}", err=True)
        try:
            results = mon.run(stop=stop, rounds=rounds)
        except KeyboardInterrupt:
            stop.set()
            results = []
    for r in results:
        click.echo(f"{r.out_dir}: drift {None if r.drift is None else r.drift['drift_detected']}, A/B {None if r.ab is None else r.ab['verdict']}, alerts {[a.kind for a in r.alerts]}")


@click.command()
@click.option("--host", default=None, help="Bind address [BROADFAST_UI_HOST].")
@click.option("--port", type=int, default=None, help="Port [BROADFAST_UI_PORT].")
@click.option("--workspace", type=click.Path(file_okay=False, path_type=Path), default=None, help="Workspace folder [BROADFAST_MONITOR_WORKSPACE].")
def ui(host: str | None, port: int | None, workspace: Path | None) -> None:
    """The Evidently UI over the report workspace (drift and A/B snapshots)."""
    from broadfast.monitoring.ui import serve_ui

    settings = command_settings(ui_host=host, ui_port=port, monitor_workspace=workspace)
    serve_ui(settings)
