"""The loop's figures in a monitoring round: labels and hard cases per minute from the window,
the serving version's validation quality from the registry, saved for the drift dashboard."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from broadfast.core.settings import Settings
from broadfast.monitoring.loop import LOOP_FIGURES, loop_report, traffic_figures
from broadfast.monitoring.monitor import Monitor
from broadfast.simulation.clicks import noisy_oracle, simulate_ab, to_events
from broadfast.monitoring.traffic import TrafficWindow
from broadfast.monitoring.workspace import DRIFT_PROJECT, open_workspace, project_id
from broadfast.core.experiments import Experiment
from broadfast.core.events import Perspective, TeacherLabel, pair_id
from broadfast.model.registry import Registry
from broadfast.model.student import StudentConfig, build_student, save_student

SOLO = Experiment("none", "v0001", "v-chall", 1e-9, "salt", "running", 0.0)


def test_a_round_records_labels_per_minute_and_the_serving_versions_quality(bus_settings: Settings, tmp_path: Path, homedepot_dev: pd.DataFrame) -> None:
    settings = bus_settings.model_copy(update={"home": tmp_path / "home", "monitor_interval_s": 60.0, "monitor_current_rows": 500, "monitor_sample_rows": 2000})
    torch.manual_seed(0)
    folder = save_student(build_student(StudentConfig.tiny()), tmp_path / "model")
    assert Registry(settings).publish(folder, announce=False, metrics={"val_spearman": 0.31, "val_ndcg@10": 0.9, "stream_spearman": 0.27}).version == "v0001"

    now = time.time()
    scored, clicks = simulate_ab(homedepot_dev, SOLO, {"champion": noisy_oracle(), "challenger": noisy_oracle()}, n_requests=120, seed=1, start_ts=now - 50)
    scored["experiment_id"] = None
    window = TrafficWindow(100_000)
    for event in to_events(scored, clicks):
        window.add(event)
    probs = (0.05, 0.05, 0.9)
    for i, row in scored.head(45).iterrows():  # 30 labels in the last minute, 15 older than the round's interval
        ts = now - 20 if i < 30 else now - 300
        window.add(TeacherLabel(pair_id=pair_id(row["query"], row["ad_id"]), query=row["query"], ad_id=row["ad_id"], ts=ts, teacher_id="oracle",
                                perspectives=[Perspective(name="oracle", rationale="human grade", probs=probs)], probs=probs))  # fmt: skip

    result = Monitor(settings).run_round(window)
    loop = result.loop
    assert loop is not None and loop["model_version"] == "v0001"
    assert loop["labels_per_min"] == pytest.approx(30.0) and loop["hard_cases_per_min"] == 0.0 and loop["hard_case_rate"] == 0.0
    assert loop["val_spearman"] == pytest.approx(0.31) and loop["val_ndcg_at_10"] == pytest.approx(0.9) and loop["stream_spearman"] == pytest.approx(0.27)
    assert json.loads((result.out_dir / "round.json").read_text())["loop"]["labels_per_min"] == pytest.approx(30.0)
    ws = open_workspace(settings)
    assert loop["snapshot_id"] in {str(r) for r in ws.list_runs(project_id(ws, DRIFT_PROJECT))}


def test_a_version_without_figures_still_gets_its_traffic_figures() -> None:
    frames = {"scored": pd.DataFrame({"ts": [10.0, 50.0]}), "labels": pd.DataFrame({"ts": []}), "hardcases": pd.DataFrame({"ts": [49.0]})}
    figures = traffic_figures(frames, interval_s=30.0, now=60.0)
    assert figures == {"labels_per_min": 0.0, "hard_cases_per_min": 2.0, "hard_case_rate": 1.0}
    assert set(figures) < set(LOOP_FIGURES)
    snapshot = json.dumps(loop_report(figures | {"val_spearman": float("nan")}, "v9").dict())  # a non-finite figure is left out, not plotted as 0
    assert "labels_per_min" in snapshot and "hard_case_rate" in snapshot and "val_spearman" not in snapshot
