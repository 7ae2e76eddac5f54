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

from serving.backends import resolve_backend

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


def test_demo_closes_the_loop(tmp_path: Path, shared_data: Path) -> None:
    home = tmp_path / "home"
    summary_path = tmp_path / "summary.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROADFAST_")} | {
        "BROADFAST_HOME": str(home),
        "BROADFAST_DATA": str(shared_data / "homedepot" / "dev.parquet"),
        # a fast loop: small rounds, publish whenever the gate allows, a generous gate
        "BROADFAST_ONLINE_ROUND_LABELS": "8",
        "BROADFAST_ONLINE_ROUND_WAIT_S": "2",
        "BROADFAST_ONLINE_PUBLISH_EVERY_S": "5",
        "BROADFAST_ONLINE_GATE_TOLERANCE": "1.0",
        "BROADFAST_ONLINE_VAL_PAIRS": "60",
        "BROADFAST_STREAM_BUDGET_PER_S": "5",
        "BROADFAST_MONITOR_INTERVAL_S": "20",
    }
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
