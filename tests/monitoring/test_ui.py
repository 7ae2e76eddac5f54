"""`broadfast ui` serves the Evidently UI over the workspace; a real headless Chromium renders it.

Needs Debian's Chromium (CI: ``apt-get install -y chromium``). The screenshots are kept
under ``$BROADFAST_TEST_ARTIFACTS/monitoring-ui`` when that is set, else in the test's
temporary folder; the test prints where.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

from broadfast.settings import Settings
from monitoring.drift import drift_report
from monitoring.window import window_from_pairs
from monitoring.workspace import (
    DRIFT_PROJECT,
    open_workspace,
    project_id,
    save_snapshot,
)
from tests.monitoring.conftest import scored

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--virtual-time-budget=15000",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
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


def test_ui_page_loads_in_headless_chromium(tmp_path: Path, artifacts: Path, homedepot_dev: pd.DataFrame, crowdflower_dev: pd.DataFrame) -> None:
    settings = Settings(home=tmp_path / "home", monitor_sample_rows=3000)
    result = drift_report(window_from_pairs(scored(homedepot_dev)), window_from_pairs(scored(crowdflower_dev)), settings, name="ui test drift")
    snapshot_id = save_snapshot(settings, DRIFT_PROJECT, result.snapshot)
    project = project_id(open_workspace(settings), DRIFT_PROJECT)

    port = free_port()
    env = os.environ | {"BROADFAST_HOME": str(settings.home), "BROADFAST_UI_PORT": str(port), "BROADFAST_UI_HOST": "127.0.0.1"}
    log = (tmp_path / "ui.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "broadfast.cli", "ui"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
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
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
