"""`broadfast stack up | down | status` as a user runs it: real processes, real ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from broadfast.devstack.stack import broker_answers, redis_answers

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).parent / "broadfast")


def run_cli(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROADFAST_")} | {"BROADFAST_HOME": str(home)}
    proc = subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"broadfast {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def parse_exports(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            out[key] = value.strip("'")
    return out


def stack_pids(home: Path) -> dict[str, int]:
    import json

    state = json.loads((home / "stack" / "state.json").read_text())
    return {name: svc["pid"] for name, svc in state["services"].items()}


def test_up_twice_status_and_down_leaves_nothing(tmp_path: Path) -> None:
    up = run_cli(tmp_path, "stack", "up")
    env = parse_exports(up.stdout)
    assert env["BROADFAST_KAFKA_BOOTSTRAP"].startswith("127.0.0.1:")
    assert env["BROADFAST_REDIS_URL"].startswith("redis://127.0.0.1:")
    assert env["BROADFAST_KAFKA_FLAVOR"] == "tansu"
    pids = stack_pids(tmp_path)
    try:
        assert broker_answers(env["BROADFAST_KAFKA_BOOTSTRAP"])
        assert redis_answers(env["BROADFAST_REDIS_URL"])
        from kafka.admin import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=env["BROADFAST_KAFKA_BOOTSTRAP"])
        topics = {t["name"]: len(t["partitions"]) for t in admin.describe_topics()}
        admin.close()
        for name in ("requests", "scored", "clicks", "hardcases", "labels", "models", "alerts", "deadletter"):
            assert topics.get(f"relevance.{name}") == 3, name

        again = run_cli(tmp_path, "stack", "up")  # safe: reuses the running stack
        assert parse_exports(again.stdout) == env
        assert "already running" in again.stderr
        assert stack_pids(tmp_path) == pids

        status = run_cli(tmp_path, "stack", "status")
        assert "running" in status.stdout and str(pids["broker"]) in status.stdout
    finally:
        down = run_cli(tmp_path, "stack", "down")
    assert "broker" in down.stdout and "redis" in down.stdout
    for pid in pids.values():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not (tmp_path / "stack" / "state.json").exists()
    assert run_cli(tmp_path, "stack", "status", check=False).returncode == 3
    assert "nothing to stop" in run_cli(tmp_path, "stack", "down").stdout


def test_stale_state_from_a_killed_stack_is_cleaned(tmp_path: Path) -> None:
    run_cli(tmp_path, "stack", "up")
    old = stack_pids(tmp_path)
    os.kill(old["broker"], signal.SIGKILL)  # the broker dies; redis survives, orphaned
    deadline = time.monotonic() + 5
    while psutil.pid_exists(old["broker"]) and psutil.Process(old["broker"]).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        status = run_cli(tmp_path, "stack", "status", check=False)
        assert status.returncode == 3 and "STALE" in status.stdout and "dead" in status.stdout

        up = run_cli(tmp_path, "stack", "up")
        assert "stale stack state" in up.stderr
        new = stack_pids(tmp_path)
        assert new["broker"] != old["broker"] and new["redis"] != old["redis"]
        assert not psutil.pid_exists(old["redis"]) or psutil.Process(old["redis"]).status() == psutil.STATUS_ZOMBIE
        assert broker_answers(parse_exports(up.stdout)["BROADFAST_KAFKA_BOOTSTRAP"])
    finally:
        run_cli(tmp_path, "stack", "down")


def test_a_reused_pid_is_never_ours(tmp_path: Path) -> None:
    """A state file naming a live process we did not start (other start time) is stale, and that process is left alone."""
    from broadfast.core.settings import Settings
    from broadfast.devstack.stack import EmbeddedStack, Service, StackState

    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        state = StackState(started_at=time.time(), services={
            "broker": Service("broker", stranger.pid, psutil.Process(stranger.pid).create_time() - 100, 1, ["x"], "/dev/null"),
            "redis": Service("redis", stranger.pid, psutil.Process(stranger.pid).create_time() - 100, 2, ["x"], "/dev/null"),
        })
        path = tmp_path / "stack" / "state.json"
        path.parent.mkdir(parents=True)
        path.write_text(state.to_json())
        stack = EmbeddedStack(Settings(home=tmp_path))
        assert stack.status()["running"] is False
        assert stack.down() == []
        assert stranger.poll() is None  # untouched
        # the same PID and wall-clock start time, but another start tick or another program: not ours
        from broadfast.devstack.stack import start_ticks

        real = psutil.Process(stranger.pid).create_time()
        ticks = start_ticks(stranger.pid)
        assert ticks is not None
        assert Service("x", stranger.pid, real, 1, [sys.executable], "/dev/null", ticks).process() is not None
        assert Service("x", stranger.pid, real, 1, [sys.executable], "/dev/null", ticks + 1).process() is None
        assert Service("x", stranger.pid, real, 1, ["/bin/true"], "/dev/null", ticks).process() is None
        assert not path.exists()  # the stale state is cleaned
    finally:
        stranger.kill()
        stranger.wait()
