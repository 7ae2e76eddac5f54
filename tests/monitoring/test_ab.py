"""A/B comparisons on simulated traffic (replay planner + click model, real data set)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from broadfast.core.settings import Settings
from broadfast.monitoring.ab import arm_column, compare, two_proportion_z, wilson_interval
from broadfast.simulation.clicks import noisy_oracle, shuffled, simulate_ab
from broadfast.core.experiments import Experiment

EXP = Experiment("exp-test", "v-champ", "v-chall", 0.5, "salt", "running", 0.0)
GOOD = noisy_oracle()


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(home=tmp_path, ab_min_impressions=500)


def labels_for(scored: pd.DataFrame, df: pd.DataFrame, n: int = 400) -> pd.DataFrame:
    """Teacher labels (the oracle teacher: the human grade) for some scored pairs."""
    from broadfast.core.events import pair_id

    grades = df.drop_duplicates(["query", "ad_id"]).set_index(["query", "ad_id"])["grade"]
    pairs = scored.drop_duplicates(["query", "ad_id"]).head(n)
    return pd.DataFrame({"pair_id": [pair_id(q, a) for q, a in zip(pairs["query"], pairs["ad_id"])], "label": [grades[(q, a)] for q, a in zip(pairs["query"], pairs["ad_id"])]})


def test_statistics_match_scipy() -> None:
    z, p = two_proportion_z(120, 1000, 150, 1000)
    table = np.array([[120, 880], [150, 850]])
    chi2, p_chi, _, _ = stats.chi2_contingency(table, correction=False)
    assert math.isclose(z * z, chi2, rel_tol=1e-9) and math.isclose(p, p_chi, rel_tol=1e-9)
    lo, hi = wilson_interval(30, 200)
    ref = stats.binomtest(30, 200).proportion_ci(method="wilson")
    assert math.isclose(lo, ref.low, rel_tol=1e-6) and math.isclose(hi, ref.high, rel_tol=1e-6)


def test_worse_challenger_is_rolled_back(settings: Settings, homedepot_dev: pd.DataFrame) -> None:
    scored, clicks = simulate_ab(homedepot_dev, EXP, {"champion": GOOD, "challenger": shuffled(GOOD)}, n_requests=2000, seed=1)
    result = compare(EXP, scored, clicks, settings, labels=labels_for(scored, homedepot_dev))
    assert result.verdict == "roll_back"
    assert "significantly below" in result.reason and result.guardrails
    champ, chall = result.arms["champion"], result.arms["challenger"]
    assert chall.ctr < champ.ctr and result.p_value < settings.monitoring.ab_alpha and result.ctr_lift < 0
    assert champ.ctr_ci95[0] < champ.ctr < champ.ctr_ci95[1]
    # shuffling keeps the score distribution; the grades it predicts no longer match the labels
    assert abs(chall.score_mean - champ.score_mean) < 0.02
    assert champ.teacher_agreement > chall.teacher_agreement + 0.2
    assert set(result.snapshots) == {"scores", "classification_champion", "classification_challenger", "arms"}
    json.dumps(result.to_dict(), default=str)  # JSON-ready
    # the arms report carries the figures the A/B dashboard plots, one MeanValue each
    figures = {m["config"]["column"]: m["value"] for m in result.snapshots["arms"].dict()["metrics"]}
    for arm, arm_stats in result.arms.items():
        assert math.isclose(figures[arm_column(arm, "ctr")], arm_stats.ctr) and math.isclose(figures[arm_column(arm, "teacher_agreement")], arm_stats.teacher_agreement)
        assert (figures[arm_column(arm, "ctr_ci95_low")], figures[arm_column(arm, "ctr_ci95_high")]) == pytest.approx(arm_stats.ctr_ci95)
    assert figures["p_value"] == pytest.approx(result.p_value) and arm_column("challenger", "error_rate") not in figures  # no serving counters: left out
    assert not result.snapshots["arms"].dict()["tests"]


def test_better_challenger_is_recommended_for_promotion(settings: Settings, homedepot_dev: pd.DataFrame) -> None:
    scored, clicks = simulate_ab(homedepot_dev, EXP, {"champion": shuffled(GOOD), "challenger": GOOD}, n_requests=2000, seed=2)
    result = compare(EXP, scored, clicks, settings, reports=False)
    assert result.verdict == "promote", result.reason
    assert result.arms["challenger"].ctr > result.arms["champion"].ctr and not result.guardrails


def test_equal_arms_keep_running(settings: Settings, homedepot_dev: pd.DataFrame) -> None:
    scored, clicks = simulate_ab(homedepot_dev, EXP, {"champion": GOOD, "challenger": GOOD}, n_requests=1500, seed=3)
    result = compare(EXP, scored, clicks, settings, reports=False)
    assert result.verdict == "keep_running" and "no significant" in result.reason


def test_too_little_traffic_keeps_running(settings: Settings, homedepot_dev: pd.DataFrame) -> None:
    scored, clicks = simulate_ab(homedepot_dev, EXP, {"champion": GOOD, "challenger": shuffled(GOOD)}, n_requests=60, seed=4)
    result = compare(EXP, scored, clicks, settings, reports=False)
    assert result.verdict == "keep_running" and "not enough impressions" in result.reason


def test_error_rate_and_latency_guardrails(settings: Settings, homedepot_dev: pd.DataFrame) -> None:
    scored, clicks = simulate_ab(homedepot_dev, EXP, {"champion": GOOD, "challenger": GOOD}, n_requests=300, seed=5)
    counts = {"champion": {"requests": 150, "errors": 0}, "challenger": {"requests": 150, "errors": 30}}
    result = compare(EXP, scored, clicks, settings, counts=counts, reports=False)
    assert result.verdict == "roll_back" and "error rate 0.200" in result.reason
    slow, clicks = simulate_ab(homedepot_dev, EXP, {"champion": GOOD, "challenger": GOOD}, n_requests=300, seed=5, latency_ms={"champion": 20.0, "challenger": 400.0})
    result = compare(EXP, slow, clicks, settings, reports=False)
    assert result.verdict == "roll_back" and "p99 latency" in result.reason
    assert result.arms["challenger"].latency_p99_ms > 400 > result.arms["champion"].latency_p99_ms


def test_other_experiments_are_ignored(settings: Settings, homedepot_dev: pd.DataFrame) -> None:
    scored, clicks = simulate_ab(homedepot_dev, EXP, {"champion": GOOD, "challenger": shuffled(GOOD)}, n_requests=300, seed=6)
    other = Experiment("exp-other", "a", "b", 0.5, "s", "running", 0.0)
    result = compare(other, scored, clicks, settings, reports=False)
    assert result.arms["champion"].impressions == 0 and result.verdict == "keep_running"
