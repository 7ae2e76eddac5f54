"""End to end: the whole loop as `broadfast demo` runs it, CI-sized.

Tiny student, oracle teacher, a few hundred requests: hard cases travel scored → sampled →
labelled → trained → published → swapped, the served version changes with no failed
request, a drift report is written, and nothing is left running.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from broadfast.core.settings import Settings
from broadfast.monitoring.dashboards import PANELS
from broadfast.monitoring.window import MODEL_COLUMNS
from broadfast.monitoring.workspace import DRIFT_PROJECT, open_workspace, project_id
from broadfast.serving.backends import resolve_backend
from tests.monitoring.test_ui import artifacts, assert_dashboard_shows_data, serve_ui  # noqa: F401  (artifacts: the fixture)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def processes_with_home(home: Path) -> list[int]:
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if f"BROADFAST_HOME={home}".encode() in Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0"):
                found.append(proc.pid)
        except (OSError, psutil.Error):
            continue
    return found


def demo_env(home: Path, shared_data: Path, **extra: str) -> dict[str, str]:
    """A CI-sized loop: small rounds, publish whenever the gate allows, a generous gate; Home Depot dev traffic."""
    return {k: v for k, v in os.environ.items() if not k.startswith("BROADFAST_")} | {
        "BROADFAST_HOME": str(home),
        "BROADFAST_DATA": str(shared_data / "homedepot" / "dev.parquet"),
        "BROADFAST_ONLINE_ROUND_LABELS": "8",
        "BROADFAST_ONLINE_ROUND_WAIT_S": "2",
        "BROADFAST_ONLINE_PUBLISH_EVERY_S": "5",
        "BROADFAST_ONLINE_GATE_TOLERANCE": "1.0",
        "BROADFAST_STREAM_BUDGET_PER_S": "5",
    } | extra


def test_demo_closes_the_loop(tmp_path: Path, shared_data: Path, artifacts: Path) -> None:
    home = tmp_path / "home"
    summary_path = tmp_path / "summary.json"
    env = demo_env(home, shared_data, BROADFAST_ONLINE_VAL_PAIRS="60", BROADFAST_MONITOR_INTERVAL_S="20")
    cli = Path(sys.executable).parent / "broadfast"
    proc = subprocess.run(
        [str(cli), "demo", "--duration", "75", "--rate", "4", "--teacher", "oracle", "--student", "tiny", "--student-layers", "1",
         "--bootstrap-pairs", "64", "--no-live", "--summary", str(summary_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    summary = json.loads(summary_path.read_text())
    for key in ("requests", "pairs_scored", "hard_cases", "labels", "models_published", "swaps", "failed_requests", "serving_p99_ms", "freshness_s", "drift_reports"):
        assert key in summary, key
    assert summary["requests"] >= 200
    # the backend in use (the default, auto: int8 on this CPU, converted for every version served) and its latency
    assert summary["serving_backend"]["name"] == resolve_backend("auto", "cpu") and summary["serving_p99_ms"] > 0
    assert summary["failed_requests"] == 0 and summary["events_lost"] == 0
    assert summary["pairs_scored"] >= summary["requests"]
    assert summary["hard_cases"] > 0 and summary["labels"] > 0
    assert summary["models_published"] >= 1
    assert summary["swaps"] >= 1 and len(summary["versions_served"]) >= 2
    assert summary["freshness_s"]["n"] > 0 and summary["freshness_s"]["p50"] is not None
    assert summary["drift_reports"] and all(Path(p).exists() for p in summary["drift_reports"])
    quality = summary["quality"]  # each version's validation figures and the teachers behind them
    assert quality["teacher"] == "oracle" and all(t.startswith("oracle:") for t in quality["teacher_ids"])
    served = [v for v in quality["versions"] if v["served"]]
    assert len(served) >= 2 and all(v["spearman"] is not None for v in served)
    assert quality["first"]["version"] == summary["versions_served"][0]
    first = json.loads((home / "demo" / "registry" / "student" / quality["first"]["version"] / "manifest.json").read_text())
    assert first["student"]["layers"] == 1 and first["student"]["init_from"] == "student"  # --student-layers 1 of the tiny 2-layer encoder
    assert any(any(t.startswith("oracle:") for t in v["teachers"]) for v in served[1:])
    assert "student quality" in proc.stdout
    assert "freshness" in proc.stdout and "swaps" in proc.stdout
    assert processes_with_home(home) == [], "the demo left processes behind"

    # after the demo, `broadfast ui` opens the drift dashboard on the rounds the monitor saved
    ui_settings = Settings(home=home / "demo")
    pid = project_id(open_workspace(ui_settings), DRIFT_PROJECT)
    with serve_ui(ui_settings, tmp_path) as base:
        # a version's model columns are tested only once it served long enough to get its own reference, and the
        # traffic slice's figures only once its held-out labels were measured: a 75 s demo need not reach either
        assert_dashboard_shows_data(base, pid, PANELS[DRIFT_PROJECT], tmp_path, "demo-drift", artifacts,
                                    may_lack={"Drift score of the model columns", "Spearman (newest held-out traffic)"})  # fmt: skip


def test_demo_shift_scenario_marks_the_shift_raises_drift_and_measures_the_new_traffic(tmp_path: Path, shared_data: Path) -> None:
    """`broadfast demo --shift-to`: Home Depot traffic, then CrowdFlower; CI-sized (tiny student, short rounds)."""
    home = tmp_path / "home"
    summary_path = tmp_path / "summary.json"
    interval = 15
    # a window that the CI-sized traffic fills within a round
    env = demo_env(home, shared_data, BROADFAST_ONLINE_VAL_PAIRS="80", BROADFAST_MONITOR_INTERVAL_S=str(interval), BROADFAST_MONITOR_CURRENT_ROWS="300")
    cli = Path(sys.executable).parent / "broadfast"
    proc = subprocess.run(
        [str(cli), "demo", "--duration", "120", "--rate", "4", "--teacher", "oracle", "--student", "tiny", "--bootstrap-pairs", "64",
         "--shift-to", str(shared_data / "crowdflower" / "dev.parquet"), "--shift-after", "50", "--no-live", "--summary", str(summary_path)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    summary = json.loads(summary_path.read_text())
    shift = summary["shift"]
    assert shift["simulated"] is True and shift["ts"] is not None and shift["to"].endswith("crowdflower/dev.parquet")
    assert summary["failed_requests"] == 0 and summary["events_lost"] == 0
    # the oracle answered from both data sets
    assert any("homedepot/dev.parquet+crowdflower/dev.parquet" in t for t in summary["quality"]["teacher_ids"])
    # detection: a drift alert after the shift, after two drifted rounds in a row, naming input columns
    alert = shift["drift_alert"]
    assert alert is not None, f"no drift alert after the shift; alerts: {summary['alerts']}"
    assert 0 <= alert["delay_s"] <= 3 * interval + 30 and alert["rounds_in_a_row"] >= 2
    assert set(alert["drifted_columns"]) - set(MODEL_COLUMNS), f"only model columns drifted: {alert['drifted_columns']}"
    # quality on the new traffic's held-out queries, before and after, on the same pairs
    q = shift["quality_on_new_traffic"]
    assert q["pairs"] > 0 and q["at_shift"] is not None and q["last"] is not None
    assert all(isinstance(q[r]["spearman"], float) for r in ("at_shift", "last"))
    assert shift["spearman_gain"] == pytest.approx(q["last"]["spearman"] - q["at_shift"]["spearman"], abs=1e-3)
    assert "traffic shift (simulated)" in proc.stdout and "quality on the new traffic" in proc.stdout
    assert processes_with_home(home) == [], "the demo left processes behind"
