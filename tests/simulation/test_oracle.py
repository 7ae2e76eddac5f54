"""The oracle teacher: the human grade, full confidence, and the raters' mean relevance spread
over neighbouring grades on the file's own scale (or the one-hot grade where there is none)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from broadfast.core.datasets import load_pairs
from broadfast.core.events import pair_id
from broadfast.teacher.labels import to_event
from broadfast.teacher.mpcot import Label, LabelFailure, Pair
from broadfast.teacher.errors import TeacherError
from broadfast.core.settings import Settings
from broadfast.simulation.oracle import OracleTeacher


def pair(query: str, ad: str) -> Pair:
    return Pair(pair_id(query, ad), query, ad, ad.title())


def frame(**cols) -> pd.DataFrame:
    n = len(cols["grade"])
    base = {"query": [f"q{i}" for i in range(n)], "ad_id": [f"a{i}" for i in range(n)], "title": [f"t{i}" for i in range(n)]}
    return pd.DataFrame(base | cols)


def test_relevance_is_spread_over_neighbouring_grades_on_the_files_own_scale():
    # a 1–4 scale (CrowdFlower-like)
    df = frame(relevance=[4.0, 1.0, 3.0, 2.0, 1.75], grade=[2, 0, 1, 1, 0])
    t = OracleTeacher.from_frame(df, source="cf/dev.parquet", smoothing=0.0)
    assert t.teacher_id == "oracle:human-relevance(cf/dev.parquet)" and t.scale == (1.0, 4.0)
    labels = t.label([pair(f"q{i}", f"a{i}") for i in range(5)])
    assert all(isinstance(lab, Label) for lab in labels)
    got = np.array([lab.probs for lab in labels])
    # x = (r - 1) / 3 · 2 on grades 0..2: 2, 0, 4/3, 2/3, 1/2
    want = [(0, 0, 1), (1, 0, 0), (0, 2 / 3, 1 / 3), (1 / 3, 2 / 3, 0), (1 / 2, 1 / 2, 0)]
    assert got == pytest.approx(np.array(want), abs=1e-6)
    # the expected score P(exact) + ½·P(partial) is linear in the raters' mean
    scores = got[:, 2] + 0.5 * got[:, 1]
    assert scores == pytest.approx((np.array([4.0, 1.0, 3.0, 2.0, 1.75]) - 1) / 3, abs=1e-6)
    # the human grade, full confidence and mass travel with each label, whatever the spread says
    assert [lab.grade for lab in labels] == [2, 0, 1, 1, 0]
    assert all(lab.confidence == 1.0 and lab.perspectives[0].mass == 1.0 and lab.failed_perspectives == () for lab in labels)
    assert "scale [1, 4]" in labels[0].perspectives[0].rationale and "simulated annotator" in labels[0].perspectives[0].rationale


def test_the_scale_is_the_files_not_a_fixed_one():
    # the same relevance 2.0 is exact on a 1–2 scale and irrelevant-or-partial on a 1–3 scale
    narrow = OracleTeacher.from_frame(frame(relevance=[1.0, 2.0], grade=[0, 2]), source="n", smoothing=0.0)
    wide = OracleTeacher.from_frame(frame(relevance=[1.0, 2.0, 3.0], grade=[0, 1, 2]), source="w", smoothing=0.0)
    assert narrow.label([pair("q1", "a1")])[0].probs == pytest.approx((0.0, 0.0, 1.0))
    assert wide.label([pair("q1", "a1")])[0].probs == pytest.approx((0.0, 1.0, 0.0))


def test_smoothing_applies_after_the_spread():
    t = OracleTeacher.from_frame(frame(relevance=[1.0, 3.0, 2.5], grade=[0, 2, 2]), source="s", smoothing=0.3)
    # 2.5 on [1, 3] spreads to (0, ½, ½); then (1 - 0.3)·p + 0.3/3
    assert t.label([pair("q2", "a2")])[0].probs == pytest.approx((0.1, 0.45, 0.45))


def test_without_relevance_the_grade_is_one_hot_and_the_id_says_grades():
    t = OracleTeacher.from_frame(frame(grade=[1, 2]), source="toy.parquet", smoothing=0.3)
    assert t.teacher_id == "oracle:human-grades(toy.parquet)" and t.scale is None
    lab = t.label([pair("q0", "a0")])[0]
    assert lab.probs == pytest.approx((0.1, 0.8, 0.1)) and lab.grade == 1 and lab.confidence == 1.0
    assert "scale" not in lab.perspectives[0].rationale


@pytest.mark.parametrize("relevance", [[2.0, 2.0], [1.0, float("nan")]], ids=["constant", "nan"])
def test_unusable_relevance_falls_back_to_the_grades(relevance):
    t = OracleTeacher.from_frame(frame(relevance=relevance, grade=[0, 2]), source="x", smoothing=0.0)
    assert t.teacher_id == "oracle:human-grades(x)"
    assert t.label([pair("q1", "a1")])[0].probs == pytest.approx((0.0, 0.0, 1.0))


def test_a_pair_listed_twice_gets_the_mean_and_the_most_common_grade():
    df = pd.DataFrame({"query": ["Drill", "drill ", "drill", "saw"], "ad_id": ["a", "a", "a", "b"], "title": ["D"] * 4, "relevance": [3.0, 2.0, 2.0, 1.0], "grade": [2, 1, 1, 0]})
    lab = OracleTeacher.from_frame(df, source="d", smoothing=0.0).label([pair("DRILL", "a")])[0]
    # mean of (0, 0, 1), (0, 1, 0), (0, 1, 0)
    assert lab.probs == pytest.approx((0.0, 2 / 3, 1 / 3)) and lab.grade == 1


def test_unknown_pair_is_a_failure_not_a_guess():
    [res] = OracleTeacher.from_frame(frame(relevance=[1.0, 3.0], grade=[0, 2]), source="x").label([pair("nope", "zz")])
    assert isinstance(res, LabelFailure) and "no human grade" in res.reason


def test_the_event_carries_grade_confidence_and_mass():
    lab = OracleTeacher.from_frame(frame(relevance=[1.0, 3.0, 2.5], grade=[0, 2, 2]), source="x").label([pair("q2", "a2")])[0]
    event = to_event(lab, np.zeros((1, 4)), first_scored_ts=3.0)
    assert event.grade == 2 and event.confidence == 1.0 and event.perspectives[0].mass == 1.0
    assert event.failed_perspectives == [] and event.teacher_id == "oracle:human-relevance(x)"


def test_from_file_on_the_real_data_names_the_file(shared_data):
    t = OracleTeacher.from_file(shared_data / "crowdflower" / "dev.parquet")
    assert t.teacher_id == "oracle:human-relevance(crowdflower/dev.parquet)" and t.scale == (1.0, 4.0)


def test_an_oracle_over_two_files_answers_each_on_its_own_scale(shared_data):
    """A shift of traffic: the oracle answers pairs of both data sets, each file's relevance on its own scale."""
    
    hd, cf = shared_data / "homedepot" / "dev.parquet", shared_data / "crowdflower" / "dev.parquet"
    both = OracleTeacher.from_settings(Settings(teacher_oracle_data=f"{hd},{cf}", teacher_oracle_smoothing=0.0))
    assert both.teacher_id == "oracle:human-relevance(homedepot/dev.parquet+crowdflower/dev.parquet)"
    for path in (hd, cf):
        alone = OracleTeacher.from_file(path, smoothing=0.0)
        row = load_pairs(path).iloc[3]
        p = pair(row["query"], str(row["ad_id"]))
        got, want = both.label([p])[0], alone.label([p])[0]
        assert isinstance(got, Label) and got.probs == pytest.approx(want.probs) and got.grade == want.grade
    assert isinstance(both.label([pair("no such query", "no-such-ad")])[0], LabelFailure)
    one = OracleTeacher.from_settings(Settings(data=hd, teacher_oracle_smoothing=0.0))
    assert one.teacher_id == "oracle:human-relevance(homedepot/dev.parquet)"
    with pytest.raises(TeacherError, match="at least one file"):
        OracleTeacher.from_settings(Settings(teacher_oracle_data=",", teacher_oracle_smoothing=0.0))
