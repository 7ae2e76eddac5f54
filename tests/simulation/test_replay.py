"""Traffic replay: request planning, the click model, and the CLI end to end on the real stack."""

from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from broadfast.core.errors import BroadfastError
from broadfast.core.settings import Settings
from broadfast.core import events as ev
from broadfast.core.datasets import load_pairs
from broadfast.simulation.replay import ClickModel, HttpScorer, Replayer, plan_requests, shifted
from tests.conftest import read_topic
from tests.devstack.test_stack import parse_exports, run_cli, stack_pids


def tiny_pairs() -> pd.DataFrame:
    rows = []
    for q in range(5):
        for a in range(4):
            rows.append({"query": f"query {q}", "ad_id": f"{q}-{a}", "title": f"ad {a}", "text": "", "grade": a % 3})
    return pd.DataFrame(rows)


class RecordingBus:
    """Records what the replayer publishes (the bus's delivery accounting: everything delivered)."""

    undelivered, pending, last_error = 0, 0, None

    def __init__(self) -> None:
        self.events: list[ev.Event] = []

    @property
    def delivered(self) -> int:
        return len(self.events)

    def publish(self, event: ev.Event) -> None:
        self.events.append(event)

    def flush(self, timeout: float | None = None) -> None:
        pass


def test_click_model_parameters() -> None:
    m = ClickModel()
    assert m.click_probability(0, 2) == pytest.approx(0.9)
    assert m.click_probability(0, 0) == pytest.approx(0.1)
    assert m.click_probability(4, 2) == pytest.approx(0.9 / 5)
    assert m.click_probability(m.slots, 2) == 0.0
    assert m.attractiveness(0) < m.attractiveness(1) < m.attractiveness(2)


def test_click_model_rates_match_probabilities() -> None:
    m = ClickModel()
    rng = np.random.default_rng(7)
    draws = np.array([m.draw([2, 0, 1], rng) for _ in range(20000)])
    expected = [m.click_probability(0, 2), m.click_probability(1, 0), m.click_probability(2, 1)]
    assert np.allclose(draws.mean(0), expected, atol=0.015)


def test_plan_groups_pairs_by_query_and_cycles() -> None:
    df = tiny_pairs()
    planned = list(plan_requests(df, limit=12, seed=3, run_id="x"))
    assert len(planned) == 12
    first_pass = [p.request.query for p in planned[:5]]
    assert sorted(first_pass) == sorted(df["query"].unique())  # each query once per pass
    for p in planned:
        ids = {a.ad_id for a in p.request.ads}
        assert ids == set(df.loc[df["query"] == p.request.query, "ad_id"])
        assert p.request.request_id.startswith("x-")
    again = list(plan_requests(df, limit=12, seed=3, run_id="x"))
    assert [p.request.model_dump(exclude={"ts"}) for p in again] == [p.request.model_dump(exclude={"ts"}) for p in planned]


def test_same_seed_same_clicks_and_scores_drive_the_ranking() -> None:
    df = tiny_pairs()

    def by_grade(request: ev.SearchRequest) -> list[float]:  # an oracle ranker
        grades = dict(zip(df["ad_id"], df["grade"]))
        return [float(grades[a.ad_id]) for a in request.ads]

    runs = []
    for _ in range(2):
        bus = RecordingBus()
        Replayer(bus, scorer=by_grade, seed=11).run(plan_requests(df, limit=20, seed=11, run_id="r"))
        runs.append([(e.request_id, e.ad_id, e.position, e.clicked) for e in bus.events if isinstance(e, ev.Click)])
    assert runs[0] == runs[1]
    grades = dict(zip(df["ad_id"], df["grade"]))
    tops = [ad for (_, ad, pos, _) in runs[0] if pos == 0]
    assert all(grades[ad] == 2 for ad in tops)


def test_a_failing_scorer_degrades_to_retrieval_order() -> None:
    def broken(request: ev.SearchRequest) -> list[float]:
        raise ConnectionError("scoring API down")

    bus = RecordingBus()
    stats = Replayer(bus, scorer=broken, seed=1).run(plan_requests(tiny_pairs(), limit=3, seed=1))
    assert stats.scoring_failed == 3 and stats.requests == 3
    assert sum(isinstance(e, ev.Click) for e in bus.events) == 12


def test_http_scorer_against_a_scoring_endpoint() -> None:
    """A minimal local HTTP endpoint that speaks the /v1/score response shape (not the real API; that is issue 5)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            results = [{"ad_id": a["ad_id"], "score": len(a["title"]) / 100, "grade_probs": [0.2, 0.3, 0.5]} for a in reversed(body["ads"])]
            payload = json.dumps({"request_id": body["request_id"], "model_version": "v1", "arm": "champion", "experiment_id": None, "results": results}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        scorer = HttpScorer(f"http://127.0.0.1:{server.server_address[1]}")
        req = ev.SearchRequest(request_id="r", ts=1, user_id="u", query="q", ads=[ev.Ad(ad_id="a", title="xx"), ev.Ad(ad_id="b", title="xxxx")])
        assert scorer(req) == [0.02, 0.04]  # back in input order
        scorer.close()
    finally:
        server.shutdown()


@pytest.mark.integration
def test_replay_500_requests_through_the_cli(tmp_path: Path, shared_data: Path) -> None:
    """The issue's check: stack up, replay 500 Home Depot dev requests, read them back, stack down."""
    import psutil

    up = run_cli(tmp_path, "stack", "up")
    env = parse_exports(up.stdout)
    pids = stack_pids(tmp_path)
    try:
        data = shared_data / "homedepot" / "dev.parquet"
        import os
        import subprocess

        from tests.devstack.test_stack import CLI

        proc = subprocess.run(
            [CLI, "replay", "--data", str(data), "--limit", "500", "--seed", "5"],
            capture_output=True, text=True, timeout=300,
            env={k: v for k, v in os.environ.items() if not k.startswith("BROADFAST_")} | env | {"BROADFAST_HOME": str(tmp_path)},
        )
        assert proc.returncode == 0, proc.stderr
        assert "replayed 500 requests" in proc.stdout
        settings = Settings(kafka_bootstrap=env["BROADFAST_KAFKA_BOOTSTRAP"], kafka_flavor="tansu")
        requests = [ev.decode("requests", r.value) for r in read_topic(settings, "requests", expect=500)]
        assert len(requests) == 500
        assert len({r.request_id for r in requests}) == 500
        df = load_pairs(data)
        known = set(zip(df["query"], df["ad_id"]))
        assert all((r.query, a.ad_id) in known for r in requests for a in r.ads)
        shown = sum(min(len(r.ads), ClickModel().slots) for r in requests)
        clicks = [ev.decode("clicks", r.value) for r in read_topic(settings, "clicks", expect=shown)]
        assert len(clicks) == shown
        per_request = Counter(c.request_id for c in clicks)
        assert set(per_request) == {r.request_id for r in requests}
        n_clicked = sum(c.clicked for c in clicks)
        assert f"{n_clicked:,} clicks" in proc.stdout
        assert 0 < n_clicked < shown
    finally:
        run_cli(tmp_path, "stack", "down")
    assert all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in pids.values())


def test_shifted_plan_switches_once_after_the_requests_or_the_seconds() -> None:
    old = tiny_pairs()
    new = tiny_pairs().assign(query=lambda d: "new " + d["query"], ad_id=lambda d: "n" + d["ad_id"])
    marks: list[float] = []
    plan = shifted(plan_requests(old, limit=None, seed=1), plan_requests(new, limit=None, seed=1), after_requests=7, on_shift=marks.append)
    got = [next(plan) for _ in range(20)]
    assert [p.request.query.startswith("new ") for p in got] == [False] * 7 + [True] * 13
    assert len(marks) == 1 and len({p.request.request_id for p in got}) == 20
    assert [p.index for p in got] == list(range(20))  # numbered on: clicks are drawn by (seed, index), so no draw repeats
    assert all(ad.ad_id.startswith("n") for p in got[7:] for ad in p.request.ads)
    timed = shifted(plan_requests(old, limit=None, seed=1), plan_requests(new, limit=None, seed=1), after_s=0.0)
    assert next(timed).request.query.startswith("new ")  # no time left for the old traffic
    with pytest.raises(BroadfastError):
        next(shifted(iter([]), iter([])))


def test_replay_shifts_to_another_data_set_through_the_cli(tmp_path: Path, shared_data: Path) -> None:
    import os
    import subprocess

    from tests.devstack.test_stack import CLI

    up = run_cli(tmp_path, "stack", "up")
    env = parse_exports(up.stdout)
    try:
        hd, cf = shared_data / "homedepot" / "dev.parquet", shared_data / "crowdflower" / "dev.parquet"
        proc = subprocess.run(
            [CLI, "replay", "--data", str(hd), "--limit", "90", "--seed", "3", "--shift-to", str(cf), "--shift-after", "40"],
            capture_output=True, text=True, timeout=300,
            env={k: v for k, v in os.environ.items() if not k.startswith("BROADFAST_")} | env | {"BROADFAST_HOME": str(tmp_path)},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "replayed 90 requests" in proc.stdout and "shifts to" in proc.stderr
        settings = Settings(kafka_bootstrap=env["BROADFAST_KAFKA_BOOTSTRAP"], kafka_flavor="tansu")
        requests = sorted((ev.decode("requests", r.value) for r in read_topic(settings, "requests", expect=90)), key=lambda r: r.ts)
        hd_pairs = set(zip(*load_pairs(hd)[["query", "ad_id"]].to_numpy().T))
        cf_pairs = set(zip(*load_pairs(cf)[["query", "ad_id"]].to_numpy().T))
        source = ["hd" if all((r.query, a.ad_id) in hd_pairs for a in r.ads) else "cf" if all((r.query, a.ad_id) in cf_pairs for a in r.ads) else "?" for r in requests]
        assert source == ["hd"] * 40 + ["cf"] * 50
        bad = subprocess.run([CLI, "replay", "--data", str(hd), "--limit", "5", "--shift-after", "2"], capture_output=True, text=True, timeout=60,
                             env={k: v for k, v in os.environ.items() if not k.startswith("BROADFAST_")} | env | {"BROADFAST_HOME": str(tmp_path)})  # fmt: skip
        assert bad.returncode == 2 and "--shift-after needs --shift-to" in bad.stderr
    finally:
        run_cli(tmp_path, "stack", "down")
