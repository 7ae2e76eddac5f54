"""The demo's figures from a tally: each version's quality, first/best/last served, freshness and its parts."""

from __future__ import annotations

from broadfast.core import events as ev
from broadfast.demo.report import Tally, freshness, quality_line, quality_summary, version_quality


def model(version: str, spearman: float, offsets: dict[str, int], ts: float) -> ev.ModelPublished:
    return ev.ModelPublished(
        version=version, parent_version=None, uri=f"file:///r/{version}", sha256="0" * 64,
        metrics={"val_spearman": spearman, "val_ndcg@10": 0.9}, trained_on={"offsets": offsets, "teachers": {"oracle:x": 10}}, ts=ts,
    )  # fmt: skip


def test_quality_reads_first_best_and_last_served_versions() -> None:
    t = Tally()
    t.quality["v0001"] = version_quality({"val_spearman": 0.10, "val_ndcg@10": 0.88}, {"teachers": {"human": 600}}, 0.0)
    for version, sp, ts in (("v0002", 0.18, 10.0), ("v0003", 0.27, 20.0), ("v0004", 0.22, 30.0), ("v0005", 0.40, 40.0)):
        t.quality[version] = version_quality(model(version, sp, {}, ts).metrics, {"teachers": {"oracle:x": 5}}, ts)
    t.version_first_ts = {"v0001": 1.0, "v0002": 11.0, "v0003": 21.0, "v0004": 31.0}  # v0005 published, never served
    t.teacher_ids["oracle:x"] = 40
    q = quality_summary(t, "oracle")
    assert q["first"]["version"] == "v0001" and q["last"]["version"] == "v0004" and q["best"]["version"] == "v0003"
    assert abs(q["spearman_gain"] - 0.12) < 1e-9
    assert [v["served"] for v in q["versions"]] == [True, True, True, True, False]
    assert q["teacher_ids"] == {"oracle:x": 40} and "simulated" in q["meaning"]
    line = quality_line(q)
    assert "first v0001 0.100" in line and "serving v0004 0.220" in line and "+0.120" in line and "got better" in line
    assert "held-out traffic" not in line  # no figures on the traffic: nothing claimed
    t.quality["v0004"] = version_quality({"val_spearman": 0.22, "stream_spearman": 0.31, "stream_labels": 150.0}, {}, 30.0)
    assert "on the newest 150 held-out traffic labels: v0004 Spearman 0.310" in quality_line(quality_summary(t, "oracle"))


def test_freshness_counts_from_first_scoring_to_the_first_response_of_a_model_trained_on_the_label() -> None:
    t = Tally()
    t.labels = [(0, 0, 100.0, 104.0, "a"), (0, 5, 100.0, 120.0, "b"), (1, 0, None, 101.0, "c"), (0, 2, 100.0, 105.0, "held")]
    t.models = [model("v0002", 0.2, {"0": 3}, 110.0), model("v0003", 0.2, {"0": 9, "1": 1}, 130.0)]
    t.version_first_ts = {"v0002": 112.0, "v0003": 133.0}
    # the third label has no first scoring; the fourth is of a held-out query (never trained on)
    assert freshness(t, lambda q: q == "held") == [(12.0, 4.0), (33.0, 20.0)]


def test_the_shifts_drift_alert_is_the_first_that_its_rounds_after_the_shift_raise() -> None:
    from types import SimpleNamespace

    from broadfast.demo.report import Tally
    from broadfast.demo.shift import first_drift_alert, served_at

    t = Tally()
    alert = lambda ts, rounds: SimpleNamespace(kind="drift", ts=ts, details={"rounds_in_a_row": rounds, "drifted_columns": ["query_tokens"]})  # noqa: E731
    t.alerts = [alert(1000.0, 2), alert(1060.0, 3), SimpleNamespace(kind="guardrail", ts=1100.0, details={}), alert(1200.0, 2)]
    # shift at 950, two rounds needed: the 1000 alert's streak (rounds 940, 1000) has one round after it — a
    # round that drifted before the shift must not count; the 1060 one (940, 1000, 1060) has two: the shift's
    assert first_drift_alert(t, 950.0, 60.0, 2).ts == 1060.0
    assert first_drift_alert(t, 950.0, 60.0, 3) is None  # no streak holds three rounds after the shift
    assert first_drift_alert(t, 900.0, 60.0, 2).ts == 1000.0
    assert first_drift_alert(t, 1010.0, 60.0, 2).ts == 1200.0  # 1060's streak has one round after 1010
    assert first_drift_alert(t, 1200.0, 60.0, 2) is None
    t.version_first_ts = {"v1": 10.0, "v2": 900.0, "v3": 1000.0, "v4": 1100.0}
    assert served_at(t, 950.0) == ("v2", "v3", "v4") and served_at(t, 5.0) == (None, "v1", "v4")
