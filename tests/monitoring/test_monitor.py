"""The monitor: drift alerts on shifted traffic, guardrail rollback through the real broker and Redis."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from broadfast.core.settings import Settings
from broadfast.monitoring.drift import drift_report
from broadfast.monitoring.monitor import Monitor
from broadfast.simulation.clicks import noisy_oracle, shuffled, simulate_ab, to_events
from broadfast.monitoring.traffic import TrafficWindow, read_recent
from broadfast.monitoring.window import window_from_pairs, window_from_traffic
from broadfast.monitoring.workspace import TRAFFIC_REFERENCE, load_reference
from broadfast.core.experiments import Experiment, ExperimentStore
from broadfast.core.events import Alert, HardCase, Perspective, TeacherLabel, decode, pair_id
from tests.conftest import read_topic
from tests.monitoring.conftest import scored

GOOD = noisy_oracle()
SOLO = Experiment("none", "v-champ", "v-chall", 1e-9, "salt", "running", 0.0)  # everyone on the champion


def traffic(df: pd.DataFrame, n_requests: int, seed: int = 0, experiment: Experiment = SOLO, models=None, version: str | None = None) -> TrafficWindow:
    scored_df, clicks = simulate_ab(df, experiment, models or {"champion": GOOD, "challenger": GOOD}, n_requests=n_requests, seed=seed, start_ts=1.7e9 + 1e5 * seed)
    if experiment is SOLO:
        scored_df["experiment_id"] = None
    if version is not None:
        scored_df["model_version"] = version
    window = TrafficWindow(100_000)
    for event in to_events(scored_df, clicks):
        window.add(event)
    return window


def label(query: str, ad_id: str, grade: int) -> TeacherLabel:
    probs = [0.05, 0.05, 0.05]
    probs[grade] = 0.9
    return TeacherLabel(pair_id=pair_id(query, ad_id), query=query, ad_id=ad_id, perspectives=[Perspective(name="oracle", rationale="human grade", probs=tuple(probs))],
                        probs=tuple(probs), teacher_id="oracle", ts=1.0)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home", monitor_sample_rows=5000, monitor_current_rows=2000, ab_min_impressions=500)


def test_unshifted_traffic_raises_no_alert_and_shifted_traffic_does_when_it_holds(settings: Settings, homedepot_dev: pd.DataFrame, crowdflower_dev: pd.DataFrame) -> None:
    assert settings.monitoring.drift_alert_rounds == 2
    monitor = Monitor(settings, reference=window_from_pairs(scored(homedepot_dev)))
    calm = monitor.run_round(traffic(homedepot_dev, 1000, seed=1))
    assert calm.drift is not None and calm.drift["drift_detected"] is False, calm.drift["drifted_columns"]
    assert calm.alerts == []
    first = monitor.run_round(traffic(crowdflower_dev, 300, seed=2))
    assert first.drift["drift_detected"] is True and first.drift["alert"] is False and first.alerts == []  # one drifted round is noted, not alerted
    assert any("1 of 2 rounds in a row" in n for n in first.notes), first.notes
    shifted = monitor.run_round(traffic(crowdflower_dev, 300, seed=3))
    assert shifted.drift["drift_detected"] is True and shifted.drift["rounds_in_a_row"] == 2
    (alert,) = shifted.alerts
    assert alert.kind == "drift" and {"query_tokens", "token_overlap"} & set(alert.details["drifted_columns"])  # input columns, not only the score
    assert Path(alert.details["report"]).exists()
    assert json.loads((shifted.out_dir / "drift" / "summary.json").read_text())["drift_detected"] is True
    assert json.loads((shifted.out_dir / "round.json").read_text())["alerts"][0]["kind"] == "drift"


def test_first_window_of_a_version_becomes_its_reference(settings: Settings, homedepot_dev: pd.DataFrame) -> None:
    monitor = Monitor(settings)
    first = monitor.run_round(traffic(homedepot_dev, 400, seed=3))
    assert first.drift is None and any("reference of the traffic" in n for n in first.notes), first.notes
    assert load_reference(settings, TRAFFIC_REFERENCE) is not None and load_reference(settings, "v-champ") is not None
    second = monitor.run_round(traffic(homedepot_dev, 400, seed=4))
    assert second.drift is not None and second.drift["metadata"]["model_version"] == "v-champ"
    assert "score" in second.drift["tested_columns"] and "query_freq" in second.drift["tested_columns"]


def test_stationary_traffic_across_a_model_swap_raises_no_drift(settings: Settings, homedepot_dev: pd.DataFrame) -> None:
    """A new version's scores are compared with its own first window, never with its predecessor's."""
    sharp = {"champion": noisy_oracle(strength=4.0, noise=0.5), "challenger": GOOD}
    old, new = traffic(homedepot_dev, 400, seed=5, version="v1"), traffic(homedepot_dev, 400, seed=6, models=sharp, version="v2")
    # the swap is visible: against v1's window, v2's scores drift
    swap = drift_report(window_from_traffic(old.frames()["scored"]), window_from_traffic(new.frames()["scored"]), settings)
    assert "score" in swap.summary["drifted_columns"]

    monitor = Monitor(settings)
    rounds = [monitor.run_round(w) for w in (old, traffic(homedepot_dev, 400, seed=7, version="v1"), new, traffic(homedepot_dev, 400, seed=8, models=sharp, version="v2"), traffic(homedepot_dev, 400, seed=9, models=sharp, version="v2"))]
    for r in rounds[1:]:
        assert r.drift is not None and r.drift["drift_detected"] is False and r.alerts == [], (r.drift["drifted_columns"], r.notes)
    assert "score" in rounds[2].drift["skipped_columns"]  # v2's first round: its own reference is being taken
    assert "score" in rounds[3].drift["tested_columns"] and rounds[3].drift["metadata"]["model_version"] == "v2"
    assert rounds[4].drift["columns"]["score"]["drifted"] is False


@pytest.mark.integration
def test_monitor_rolls_back_a_worse_challenger_through_the_broker(bus_settings: Settings, homedepot_dev: pd.DataFrame, tmp_path: Path) -> None:
    from broadfast.core.bus import EventBus

    settings = bus_settings.model_copy(update={"home": tmp_path / "home", "monitor_interval_s": 2.0, "monitor_sample_rows": 5000, "ab_min_impressions": 500})
    store = ExperimentStore.from_settings(settings)
    exp = store.start("v-champ", "v-chall", 0.5, salt="guardrail-test")
    scored_df, clicks = simulate_ab(homedepot_dev, exp, {"champion": GOOD, "challenger": shuffled(GOOD)}, n_requests=1500, seed=7)
    store.record(exp.experiment_id, "champion", ok=True, n=700)
    store.record(exp.experiment_id, "challenger", ok=True, n=800)
    grades = homedepot_dev.set_index(["query", "ad_id"])["grade"]
    pairs = scored_df.drop_duplicates(["query", "ad_id"]).head(200)
    with EventBus(settings) as bus:
        for event in to_events(scored_df, clicks):
            bus.publish(event)
        for q, a in zip(pairs["query"], pairs["ad_id"]):
            bus.publish(label(q, a, int(grades[(q, a)])))
        bus.publish(HardCase(pair_id=pair_id(pairs["query"].iloc[0], pairs["ad_id"].iloc[0]), query=pairs["query"].iloc[0], ad_id=pairs["ad_id"].iloc[0], title="t",
                             reasons=["uncertain"], student_probs=(0.3, 0.4, 0.3), model_version="v-champ", ts=1.0))
        bus.publish_raw("scored", b'{"not": "a scored event"}', key=b"x")
        bus.flush()
        window = read_recent(settings, idle_s=1.5)
        assert len(window.scored) == len(scored_df) and window.skipped == 1 and len(window.labels) == 200

        monitor = Monitor(settings, bus=bus, store=store, reference=window_from_pairs(scored(homedepot_dev)))
        (result,) = monitor.run(rounds=1)

    assert result.ab["verdict"] == "roll_back" and result.rolled_back, (result.ab["reason"], result.ab["arms"])
    assert result.ab["arms"]["challenger"]["teacher_agreement"] < result.ab["arms"]["champion"]["teacher_agreement"]
    assert store.running() is None and store.get(exp.experiment_id).status == "rolled_back"
    assert (result.out_dir / "ab" / "classification_challenger.html").exists()
    alerts = [decode("alerts", r.value) for r in read_topic(settings, "alerts", expect=1)]
    guardrail = [a for a in alerts if isinstance(a, Alert) and a.kind == "guardrail"]
    assert guardrail and guardrail[0].severity == "critical" and guardrail[0].details["rolled_back"] is True
    assert result.drift is not None and result.drift["drift_detected"] is False
    letters = read_topic(settings, "deadletter", expect=1)
    assert letters and b"not" in letters[0].value


def test_window_is_bounded_and_stream_counters_are_tested(settings: Settings, homedepot_dev: pd.DataFrame) -> None:
    from broadfast.core.events import Scored

    def window(ctr_shift: float, seed: int) -> TrafficWindow:
        base = traffic(homedepot_dev, 400, seed=seed)
        out = TrafficWindow(1500)
        rng = np.random.default_rng(seed)
        for row in scored_rows(base):
            out.add(Scored.model_validate(row | {"features": {"query_ctr": float(np.clip(rng.normal(0.2 + ctr_shift, 0.05), 0, 1)), "impressions": 10.0}}))
        return out

    calm, shifted = window(0.0, 1), window(0.3, 2)
    assert len(calm) == 1500  # bounded: the oldest events fell out
    frames = calm.frames()
    assert {"f_query_ctr", "f_impressions"} <= set(frames["scored"].columns)
    monitor = Monitor(settings, reference=window_from_traffic(window(0.0, 3).frames()["scored"]))
    assert monitor.run_round(calm).drift["columns"]["f_query_ctr"]["drifted"] is False
    result = monitor.run_round(shifted)
    assert "f_query_ctr" in result.drift["drifted_columns"] and "f_impressions" not in result.drift["drifted_columns"]


def scored_rows(window: TrafficWindow) -> list[dict]:
    from broadfast.monitoring.traffic import SCORED_FIELDS

    n = len(SCORED_FIELDS)
    return [dict(zip(SCORED_FIELDS, r[:n])) | {"grade_probs": r[n]} for r in window.scored]


def test_rounds_keep_their_interval_under_traffic_that_never_pauses(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A live stream gives no idle poll: a due round must still run once the monitor has caught up
    (it used to wait a whole extra interval, so 60 s rounds came every 120 s and alerts late)."""
    from types import SimpleNamespace

    from kafka import TopicPartition

    import broadfast.monitoring.monitor as mon
    from broadfast.monitoring.monitor import RoundResult
    from broadfast.core.events import Scored, encode

    clock = {"t": 0.0}  # monotonic and wall seconds, one per poll
    monkeypatch.setattr(mon.time, "monotonic", lambda: clock["t"])
    monkeypatch.setattr(mon.time, "time", lambda: 1.7e9 + clock["t"])
    topic = settings.topic("scored")

    class LiveConsumer:  # a record on every poll, stamped now: never idle, never behind
        def poll(self, timeout_ms: int, max_records: int) -> dict:
            clock["t"] += 1.0
            event = Scored(request_id=f"r{clock['t']:.0f}", ts=1.7e9 + clock["t"], query="drill", ad_id="a1", title="drill bit", position=0, score=0.5,
                           grade_probs=(0.2, 0.3, 0.5), model_version="v1", latency_ms=5.0)  # fmt: skip
            return {TopicPartition(topic, 0): [SimpleNamespace(value=encode(event), partition=0, offset=int(clock["t"]), key=b"drill")]}

        def commit(self, *args, **kwargs) -> None: ...

        def close(self) -> None: ...

    started: list[float] = []
    monkeypatch.setattr(Monitor, "run_round", lambda self, window: started.append(clock["t"]) or RoundResult(out_dir=Path(".")))
    settings = settings.model_copy(update={"monitor_interval_s": 10.0})
    Monitor(settings).run(rounds=3, consumer=LiveConsumer(), deadletters=SimpleNamespace(send=lambda *a, **k: None))
    assert len(started) == 3
    gaps = np.diff([0.0, *started])
    assert (gaps <= 11.0).all(), f"rounds at {started}: each should come one interval (10 s) after the last"
