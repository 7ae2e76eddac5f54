"""`broadfast drift` end to end: files (scored, unscored, scored by a model folder) and recent traffic."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from broadfast.core import settings as settings_module
from broadfast.cli.main import main
from tests.monitoring.conftest import scored


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BROADFAST_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("BROADFAST_MONITOR_SAMPLE_ROWS", "3000")
    settings_module._cached.cache_clear()
    yield tmp_path
    settings_module._cached.cache_clear()


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_drift_from_scored_files(env: Path, homedepot_dev: pd.DataFrame, crowdflower_dev: pd.DataFrame) -> None:
    ref, same, other = env / "ref.parquet", env / "same.parquet", env / "other.parquet"
    scored(homedepot_dev, 1).to_parquet(ref)
    scored(homedepot_dev, 2).to_parquet(same)
    scored(crowdflower_dev, 3).to_parquet(other)
    code, out = run("drift", "--reference", str(ref), "--current", str(same), "--out", str(env / "calm"), "--fail-on-drift")
    assert code == 0 and "drift not detected" in out
    code, out = run("drift", "--reference", str(ref), "--current", str(other), "--out", str(env / "shifted"), "--fail-on-drift")
    assert code == 3 and "drift DETECTED" in out
    summary = json.loads((env / "shifted" / "summary.json").read_text())
    assert summary["drift_detected"] is True and "score" in summary["tested_columns"] and summary["snapshot_id"]
    assert (env / "shifted" / "drift.html").stat().st_size > 10_000
    assert (env / "home" / "monitoring" / "workspace").is_dir()


def test_drift_scores_unscored_files_with_a_model_folder(env: Path, homedepot_dev: pd.DataFrame) -> None:
    from broadfast.model.student import StudentConfig, build_student, save_student

    model = save_student(build_student(StudentConfig.tiny()), env / "tiny-student")
    homedepot_dev.head(400).to_parquet(env / "a.parquet")
    homedepot_dev.tail(400).to_parquet(env / "b.parquet")
    code, out = run("drift", "--reference", str(env / "a.parquet"), "--current", str(env / "b.parquet"), "--model", str(model), "--out", str(env / "m"))
    assert code == 0, out
    summary = json.loads((env / "m" / "summary.json").read_text())
    assert {"score", "pred_grade"} <= set(summary["tested_columns"])
    # without the model the same files only get feature drift, and say so
    code, out = run("drift", "--reference", str(env / "a.parquet"), "--current", str(env / "b.parquet"), "--out", str(env / "n"))
    assert code == 0 and "not tested: score" in out


def test_drift_refuses_bad_input_clearly(env: Path) -> None:
    pd.DataFrame({"query": ["a"], "ad_id": ["p"]}).to_parquet(env / "bad.parquet")
    result = CliRunner().invoke(main, ["drift", "--reference", str(env / "bad.parquet"), "--current", str(env / "bad.parquet"), "--out", str(env / "x")])
    assert result.exit_code == 1 and "title" in result.output
    result = CliRunner().invoke(main, ["drift", "--current", str(env / "bad.parquet"), "--out", str(env / "x")])
    assert result.exit_code == 1 and "--current needs a reference" in result.output


@pytest.mark.integration
def test_drift_from_recent_traffic(bus_settings, env: Path, homedepot_dev: pd.DataFrame, monkeypatch: pytest.MonkeyPatch) -> None:
    from broadfast.simulation.clicks import noisy_oracle, simulate_ab, to_events
    from broadfast.core.experiments import Experiment
    from broadfast.core.bus import EventBus

    for key, value in {"KAFKA_BOOTSTRAP": bus_settings.kafka.kafka_bootstrap, "KAFKA_FLAVOR": "tansu", "TOPIC_PREFIX": bus_settings.kafka.topic_prefix, "REDIS_URL": bus_settings.redis.redis_url}.items():
        monkeypatch.setenv(f"BROADFAST_{key}", value)
    settings_module._cached.cache_clear()
    code, out = run("drift", "--out", str(env / "t0"))
    assert code == 1 and "no scored traffic" in out
    exp = Experiment("x", "v1", "v2", 1e-9, "s", "running", 0.0)
    frame, clicks = simulate_ab(homedepot_dev, exp, {"champion": noisy_oracle(), "challenger": noisy_oracle()}, n_requests=300, seed=1)
    with EventBus(bus_settings) as bus:
        for event in to_events(frame, clicks):
            bus.publish(event)
    code, out = run("drift", "--out", str(env / "t1"))
    assert code == 1 and "no reference window for the traffic" in out
    scored(homedepot_dev).to_parquet(env / "ref.parquet")
    code, out = run("drift", "--reference", str(env / "ref.parquet"), "--out", str(env / "t2"))
    assert code == 0, out
    summary = json.loads((env / "t2" / "summary.json").read_text())
    assert summary["current"]["rows"] == len(frame) and summary["metadata"]["current"].startswith("traffic")


@pytest.mark.integration
def test_monitor_command_runs_a_round(bus_settings, env: Path, homedepot_dev: pd.DataFrame, crowdflower_dev: pd.DataFrame, monkeypatch: pytest.MonkeyPatch) -> None:
    from broadfast.simulation.clicks import noisy_oracle, simulate_ab, to_events
    from broadfast.core.experiments import Experiment
    from broadfast.core.bus import EventBus
    from broadfast.core.events import decode
    from tests.conftest import read_topic

    for key, value in {"KAFKA_BOOTSTRAP": bus_settings.kafka.kafka_bootstrap, "KAFKA_FLAVOR": "tansu", "TOPIC_PREFIX": bus_settings.kafka.topic_prefix, "REDIS_URL": bus_settings.redis.redis_url}.items():
        monkeypatch.setenv(f"BROADFAST_{key}", value)
    settings_module._cached.cache_clear()
    exp = Experiment("x", "v1", "v2", 1e-9, "s", "running", 0.0)
    frame, clicks = simulate_ab(crowdflower_dev, exp, {"champion": noisy_oracle(), "challenger": noisy_oracle()}, n_requests=60, seed=1)
    with EventBus(bus_settings) as bus:
        for event in to_events(frame, clicks):
            bus.publish(event)
    scored(homedepot_dev).to_parquet(env / "ref.parquet")
    code, out = run("monitor", "--rounds", "2", "--interval", "2", "--reference", str(env / "ref.parquet"))
    assert code == 0, out
    first, second = [line for line in out.splitlines() if ": drift " in line]
    assert "drift True" in first and "alerts []" in first  # one drifted round is noted, not alerted
    assert "drift True" in second and "alerts ['drift']" in second
    (record,) = read_topic(bus_settings, "alerts", expect=1)
    assert decode("alerts", record.value).kind == "drift"
