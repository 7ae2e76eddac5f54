"""Drift reports on real data sets: shifted windows drift, unshifted ones do not."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from broadfast.core.settings import Settings
from broadfast.monitoring.drift import drift_report, write_report
from broadfast.monitoring.errors import WindowError
from broadfast.monitoring.window import drift_frame, query_frequency_bucket, window_from_pairs
from broadfast.monitoring.workspace import (
    DRIFT_PROJECT,
    open_workspace,
    project_id,
    save_snapshot,
)
from tests.monitoring.conftest import lengthen_queries, scored, split_by_query


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home", monitor_sample_rows=5000)


def test_same_distribution_does_not_drift(settings: Settings, homedepot_train: pd.DataFrame) -> None:
    ref, cur = split_by_query(homedepot_train)
    result = drift_report(window_from_pairs(scored(ref, 1)), window_from_pairs(scored(cur, 2)), settings)
    s = result.summary
    assert s["drift_detected"] is False, s["drifted_columns"]
    assert s["drifted_share"] < settings.monitoring.drift_share
    assert {"query_tokens", "title_tokens", "token_overlap", "query_freq", "score", "pred_grade", "label_agreement"} <= set(s["tested_columns"])
    assert s["reference"]["sampled_rows"] == 5000 and s["reference"]["rows"] == len(ref)
    # the current means the drift dashboard plots (MeanValue, no tests of their own)
    report = result.snapshot.dict()
    means = {m["config"]["column"]: m["value"] for m in report["metrics"] if m["config"]["type"].endswith(":MeanValue")}
    assert means.keys() == {"score", "label_agreement"}  # no hard_case column in a file of pairs
    assert means["score"] == pytest.approx(s["current"]["score_mean"], abs=1e-6) and means["label_agreement"] == pytest.approx(s["current"]["label_agreement"], abs=1e-6)
    assert all(t["metric_config"]["params"]["type"].endswith(("ValueDrift", "DriftedColumnsCount")) for t in report["tests"])


def test_a_version_without_its_own_reference_still_reports_its_current_means(settings: Settings, homedepot_train: pd.DataFrame) -> None:
    """A version too new for its own reference: its model columns are not tested for drift, but the mean
    score, agreement and hard-case rate the dashboard plots are still in the report."""
    from broadfast.monitoring.window import MODEL_COLUMNS

    ref, cur = split_by_query(homedepot_train)
    mine = window_from_pairs(scored(cur, 2))
    result = drift_report(window_from_pairs(scored(ref, 1)), mine, settings, model_reference=mine, model_current=mine, untested={c: "no reference yet" for c in MODEL_COLUMNS})
    s = result.summary
    assert not set(MODEL_COLUMNS) & set(s["tested_columns"]) and all(s["skipped_columns"][c] == "no reference yet" for c in MODEL_COLUMNS)
    means = {m["config"]["column"]: m["value"] for m in result.snapshot.dict()["metrics"] if m["config"]["type"].endswith(":MeanValue")}
    assert means["score"] == pytest.approx(float(mine["score"].mean()), abs=0.02), means
    assert {"label_agreement", "score"} <= set(means)


def test_another_data_set_drifts(settings: Settings, homedepot_train: pd.DataFrame, crowdflower_dev: pd.DataFrame) -> None:
    result = drift_report(window_from_pairs(scored(homedepot_train)), window_from_pairs(scored(crowdflower_dev)), settings)
    s = result.summary
    assert s["drift_detected"] is True
    assert {"query_tokens", "title_tokens"} <= set(s["drifted_columns"])
    assert s["drifted_share"] >= settings.monitoring.drift_share
    for name in s["drifted_columns"]:
        assert s["columns"][name]["drifted"] and s["columns"][name]["score"] is not None


def test_query_length_shift_drifts(settings: Settings, homedepot_train: pd.DataFrame) -> None:
    ref, cur = split_by_query(homedepot_train)
    result = drift_report(window_from_pairs(scored(ref, 1)), window_from_pairs(scored(lengthen_queries(cur), 2)), settings)
    s = result.summary
    assert s["drift_detected"] is True
    assert "query_tokens" in s["drifted_columns"] and "token_overlap" in s["drifted_columns"]
    assert s["current"]["query_tokens_mean"] > s["reference"]["query_tokens_mean"] + 2.5


def test_reports_are_valid_html_and_json_and_land_in_the_workspace(settings: Settings, homedepot_dev: pd.DataFrame, crowdflower_dev: pd.DataFrame, tmp_path: Path) -> None:
    result = drift_report(window_from_pairs(scored(homedepot_dev)), window_from_pairs(scored(crowdflower_dev)), settings, metadata={"case": "test"})
    paths = write_report(result, tmp_path / "out")
    html = paths["html"].read_text()

    class Tags(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.tags: set[str] = set()

        def handle_starttag(self, tag: str, attrs: list) -> None:
            self.tags.add(tag)

    parser = Tags()
    parser.feed(html)
    assert {"html", "head", "body", "script"} <= parser.tags
    evidently_json = json.loads(paths["json"].read_text())
    assert evidently_json["metrics"] and evidently_json["tests"]
    names = {m["config"].get("column") for m in evidently_json["metrics"]}
    assert "query_tokens" in names
    summary = json.loads(paths["summary"].read_text())
    assert isinstance(summary["drift_detected"], bool) and isinstance(summary["drifted_columns"], list)
    assert 0.0 <= summary["drifted_share"] <= 1.0 and summary["metadata"] == {"case": "test"}

    snapshot_id = save_snapshot(settings, DRIFT_PROJECT, result.snapshot)
    ws = open_workspace(settings)
    assert snapshot_id in {str(i) for i in ws.list_runs(project_id(ws, DRIFT_PROJECT))}


def test_unscored_windows_skip_prediction_drift(settings: Settings, homedepot_dev: pd.DataFrame) -> None:
    result = drift_report(window_from_pairs(homedepot_dev), window_from_pairs(homedepot_dev), settings)
    assert "score" not in result.summary["tested_columns"]
    assert "score" in result.summary["skipped_columns"]
    assert result.summary["drift_detected"] is False


def test_window_errors_are_clear(settings: Settings) -> None:
    with pytest.raises(WindowError, match="title"):
        window_from_pairs(pd.DataFrame({"query": ["a"]}))
    with pytest.raises(WindowError, match="empty"):
        drift_frame(pd.DataFrame({"query": [], "title": []}), sample_rows=10)


def test_query_frequency_buckets_and_sampling_bound() -> None:
    queries = pd.Series(["drill"] * 50 + [f"q{i}" for i in range(950)] + ["Drill "] * 5)
    buckets = query_frequency_bucket(queries)
    assert buckets.iloc[0] == "head" and buckets.iloc[-1] == "head" and buckets.iloc[100] == "tail"
    window = pd.DataFrame({"query": queries, "title": ["x"] * len(queries)})
    frame = drift_frame(window, sample_rows=100, seed=3)
    assert len(frame) == 100
    # the bucket is counted on the whole window, not the sample, and kept once per query
    assert set(frame["query_freq"]) <= {"head", "tail", None} and frame["query_freq"].notna().sum() <= 952
