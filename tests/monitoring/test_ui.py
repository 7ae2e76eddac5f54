"""`broadfast ui` serves the Evidently UI over the workspace; a real headless Chromium renders it.

Needs Debian's Chromium (CI: ``apt-get install -y chromium``). The screenshots are kept
under ``$BROADFAST_TEST_ARTIFACTS/monitoring-ui`` when that is set, else in the test's
temporary folder; the test prints where.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest

from broadfast.core.settings import Settings
from broadfast.monitoring.ab import compare
from broadfast.monitoring.dashboards import PANELS
from broadfast.monitoring.drift import drift_report
from broadfast.simulation.clicks import noisy_oracle, shuffled, simulate_ab
from broadfast.monitoring.loop import loop_report
from broadfast.monitoring.window import window_from_pairs
from broadfast.monitoring.workspace import (
    AB_PROJECT,
    DRIFT_PROJECT,
    open_workspace,
    project_id,
    save_snapshot,
)
from broadfast.core.experiments import Experiment
from tests.monitoring.conftest import lengthen_queries, scored, split_by_query
from tests.monitoring.test_ab import labels_for

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--virtual-time-budget=15000",
    "--force-prefers-reduced-motion",  # the dashboard charts draw at once instead of animating into the screenshot
]  # fmt: skip


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Chromium is missing: install Debian's package with `apt-get install -y chromium`")
    return path


def browse(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    profile.mkdir(parents=True)
    return subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url], check=False, capture_output=True, text=True, timeout=120)


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    root = Path(os.environ["BROADFAST_TEST_ARTIFACTS"]) if os.environ.get("BROADFAST_TEST_ARTIFACTS") else tmp_path / "artifacts"
    out = root / "monitoring-ui"
    out.mkdir(parents=True, exist_ok=True)
    print(f"\nUI screenshots in {out}")
    return out


@contextmanager
def serve_ui(settings: Settings, tmp_path: Path) -> Iterator[str]:
    """``broadfast ui`` over ``settings.home``'s workspace on a free port; yields its base URL."""
    host = Settings().monitoring.ui_host
    port = free_port(host)
    env = os.environ | {"BROADFAST_HOME": str(settings.home), "BROADFAST_UI_PORT": str(port), "BROADFAST_UI_HOST": host}
    log = (tmp_path / "ui.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "broadfast.cli.main", "ui"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"broadfast ui exited: {(tmp_path / 'ui.log').read_text()[-2000:]}"
            try:
                if httpx.get(f"{base}/api/version", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the UI did not answer within 90 s"
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_ui_page_loads_in_headless_chromium(tmp_path: Path, artifacts: Path, homedepot_dev: pd.DataFrame, crowdflower_dev: pd.DataFrame) -> None:
    settings = Settings(home=tmp_path / "home", monitor_sample_rows=3000)
    result = drift_report(window_from_pairs(scored(homedepot_dev)), window_from_pairs(scored(crowdflower_dev)), settings, name="ui test drift")
    snapshot_id = save_snapshot(settings, DRIFT_PROJECT, result.snapshot)
    project = project_id(open_workspace(settings), DRIFT_PROJECT)

    with serve_ui(settings, tmp_path) as base:
        projects = {p["name"] for p in httpx.get(f"{base}/api/projects", timeout=10).json()}
        assert {"broadfast drift", "broadfast A/B"} <= projects

        home = browse(f"{base}/", tmp_path / "chrome-home", "--dump-dom")
        assert "broadfast drift" in home.stdout and "broadfast A/B" in home.stdout, home.stderr[-2000:]
        report_url = f"{base}/projects/{project}/reports/{snapshot_id}"
        page = browse(report_url, tmp_path / "chrome-report", "--dump-dom")
        assert "Dataset Drift" in page.stdout and "query_tokens" in page.stdout, page.stderr[-2000:]

        for name, url in (("projects.png", f"{base}/"), ("drift-report.png", report_url)):
            shot = artifacts / name
            browse(url, tmp_path / f"chrome-{name}", f"--screenshot={shot}", "--window-size=1400,1400")
            assert shot.exists() and png_size(shot) == (1400, 1400) and shot.stat().st_size > 10_000


def with_hard_cases(window: pd.DataFrame, rate: float, seed: int) -> pd.DataFrame:
    """``window`` with a ``hard_case`` column: each pair sent to the teacher with probability ``rate``."""
    out = window.copy()
    out["hard_case"] = (np.random.default_rng(seed).random(len(out)) < rate).astype(float)
    return out


def panels_on_page(dom: str, titles: list[str]) -> dict[str, tuple[list[str], str]]:
    """Each panel of a dashboard page: its text lines and its HTML (from its title to the next panel's)."""
    body = re.sub(r"<(style|script)\b.*?</\1>", "", dom, flags=re.S)
    at = {t: body.find(f">{html.escape(t, quote=False)}<") for t in titles}
    missing = [t for t, i in at.items() if i < 0]
    assert not missing, f"panels missing from the page: {missing}"
    starts = [at[t] for t in titles]
    assert starts == sorted(starts), "panels out of order"
    out = {}
    for t, a, b in zip(titles, starts, starts[1:] + [len(body)]):
        part = body[a + 1 : b]
        lines = [html.unescape(x).strip() for x in re.split(r"<[^>]+>", part)]
        out[t] = ([x for x in lines if x][1:], part)  # [1:]: the title itself
    return out


def test_dashboards_show_their_panels_with_data(tmp_path: Path, artifacts: Path, homedepot_dev: pd.DataFrame, crowdflower_dev: pd.DataFrame) -> None:
    """A few drift rounds and A/B rounds saved as the monitor saves them: both project dashboards
    open in Chromium with every panel plotting its series (a panel without data has no legend)."""
    settings = Settings(home=tmp_path / "home", monitor_sample_rows=3000)
    ref, rest = split_by_query(homedepot_dev)
    reference = with_hard_cases(window_from_pairs(scored(ref, 1)), 0.1, 1)
    # The charts label their x axis by snapshot time to the second, and rounds within one second
    # share a label (a monitor's rounds are minutes apart): each round here starts in a new second.
    for i, current in enumerate((rest, crowdflower_dev, lengthen_queries(rest))):
        time.sleep(1.0)
        result = drift_report(reference, with_hard_cases(window_from_pairs(scored(current, i + 2)), 0.1 + 0.05 * i, i + 2), settings, name=f"ui test drift {i}")
        save_snapshot(settings, DRIFT_PROJECT, result.snapshot)
        figures = {"labels_per_min": 200.0 + 10 * i, "hard_cases_per_min": 240.0, "hard_case_rate": 0.1, "val_spearman": 0.1 + 0.05 * i, "val_ndcg_at_10": 0.9, "stream_spearman": 0.2}
        save_snapshot(settings, DRIFT_PROJECT, loop_report(figures, f"v000{i + 1}"))
    exp = Experiment("exp-ui", "v-champ", "v-chall", 0.5, "salt", "running", 0.0)
    for seed in (1, 2):
        time.sleep(1.0)
        scored_df, clicks = simulate_ab(homedepot_dev, exp, {"champion": noisy_oracle(), "challenger": shuffled(noisy_oracle())}, n_requests=600, seed=seed)
        counts = {"champion": {"requests": 300, "errors": 1}, "challenger": {"requests": 300, "errors": 4}}
        ab = compare(exp, scored_df, clicks, settings, labels=labels_for(scored_df, homedepot_dev), counts=counts)
        assert set(ab.snapshots) == {"scores", "classification_champion", "classification_challenger", "arms"}
        for snap in ab.snapshots.values():
            save_snapshot(settings, AB_PROJECT, snap)
    ws = open_workspace(settings)
    projects = {name: project_id(ws, name) for name in PANELS}

    with serve_ui(settings, tmp_path) as base:
        for name, pid in projects.items():
            panels = PANELS[name]
            stored = httpx.get(f"{base}/api/v2/dashboards/{pid}", timeout=10).json()
            assert [p["title"] for p in stored["panels"]] == [p.title for p in panels]

            slug = "drift" if name == DRIFT_PROJECT else "ab"
            assert_dashboard_shows_data(base, pid, panels, tmp_path, slug, artifacts)


def assert_dashboard_shows_data(base: str, pid: Any, panels: Sequence[Any], tmp_path: Path, slug: str, artifacts: Path, *, may_lack: Collection[str] = ()) -> None:
    """The project's dashboard page, opened in headless Chromium, shows every panel plotting each of its
    series (a series is listed once it has points), except the series named in ``may_lack`` (legends,
    or panel titles for a whole panel); a screenshot is kept in ``artifacts``."""
    page = browse(f"{base}/projects/{pid}", tmp_path / f"chrome-{slug}", "--dump-dom")
    assert "currently empty" not in page.stdout, page.stderr[-2000:]
    shown = panels_on_page(page.stdout, [p.title for p in panels])
    for panel in panels:
        if panel.title in may_lack:
            continue
        seen, part = shown[panel.title]
        legends = [m.legend for m in panel.values if m.legend and "{{" not in m.legend and m.legend not in may_lack] or ["score"]  # "{{column}}": one series per column
        assert all(legend in seen for legend in legends), (panel.title, legends, seen)
        kind = panel.plot_params["plot_type"]
        if kind == "counter":
            assert sum(bool(re.fullmatch(r"\d+(\.\d+)?", t)) for t in seen) == len(legends), (panel.title, seen)
        else:  # the points drawn: a mark per point of each line, a bar per point
            drawn = part.count("MuiMarkElement-root") if kind == "line" else part.count("MuiBarElement-root")
            assert "Timestamps" in seen and drawn >= len(legends), (panel.title, drawn, seen)

    shot = artifacts / f"{slug}-dashboard.png"
    browse(f"{base}/projects/{pid}", tmp_path / f"chrome-{slug}-shot", f"--screenshot={shot}", "--window-size=1400,2600")
    assert shot.exists() and png_size(shot) == (1400, 2600) and shot.stat().st_size > 50_000


def test_dashboard_panels_are_written_once(tmp_path: Path) -> None:
    """Opening a project again adds no panel twice, restores an edited one in place and keeps hand-made ones."""
    from evidently.sdk.panels import text_panel

    from broadfast.monitoring.dashboards import ensure_dashboard

    settings = Settings(home=tmp_path / "home")
    ws = open_workspace(settings)
    for name, panels in PANELS.items():
        pid = project_id(ws, name)
        titles = [p.title for p in panels]
        first = ws.get_dashboard(pid)
        assert [p.title for p in first.panels] == titles and len(set(titles)) == len(titles)
        assert project_id(ws, name) == pid and not ensure_dashboard(ws, pid, name)
        assert [p.id for p in ws.get_dashboard(pid).panels] == [p.id for p in first.panels]

        ws.get_project(pid).dashboard.add_panel(text_panel("notes"))
        edited = ws.get_dashboard(pid)
        edited.panels[0].title, edited.panels[1].subtitle = "renamed by hand", "edited"
        ws.save_dashboard(pid, edited)
        project_id(open_workspace(settings), name)
        again = ws.get_dashboard(pid)
        assert [p.title for p in again.panels] == titles + ["renamed by hand", "notes"]
        assert again.panels[1].id == first.panels[1].id and again.panels[1].subtitle == panels[1].subtitle
