"""The demo's process supervisor: each component a ``broadfast …`` child process with its log file,
started, watched, and stopped by its process group (so no grandchild survives the demo)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from broadfast.core.errors import BroadfastError

log = logging.getLogger(__name__)


def broadfast_argv(*args: str) -> list[str]:
    """The command line of ``broadfast ARGS`` run by this interpreter."""
    return [sys.executable, "-m", "broadfast.cli.main", *args]


def run_step(env: dict[str, str], *args: str, timeout_s: float = 600.0) -> subprocess.CompletedProcess:
    """Run ``broadfast ARGS`` to completion (a set-up step or a report) and return what it did."""
    return subprocess.run(broadfast_argv(*args), env=env, capture_output=True, text=True, timeout=timeout_s)


class Component:
    """One ``broadfast …`` child process with its log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.argv = broadfast_argv(*args)
        self.env = env
        self.log_path = logs / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        out = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its life
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        log.info("started %s (pid %d): %s", self.name, self.proc.pid, " ".join(self.argv[3:]))

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> str:
        if self.proc is None:
            return "not started"
        code = self.proc.poll()
        return "running" if code is None else f"exited {code}"

    def stop(self, grace_s: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s: killing it", self.name, grace_s)
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def wait_ready(url: str, serve: Component, timeout_s: float = 180.0) -> None:
    """Wait until the scoring API at ``url`` answers ``/readyz``; fail with its log if it exits."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not serve.alive:
            raise BroadfastError(f"the scoring API exited during start-up; its log ends:\n{serve.tail()}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise BroadfastError(f"the scoring API was not ready within {timeout_s:.0f} s (log: {serve.log_path})")


def serving_backend(url: str) -> dict[str, Any] | None:
    """The inference backend of the champion the API serves (its ``/readyz``)."""
    import httpx

    try:
        return httpx.get(url + "/readyz", timeout=5).json().get("backend")
    except (httpx.HTTPError, ValueError) as exc:
        log.warning("could not read the serving backend from %s/readyz: %s", url, exc)
        return None
