"""The demo's live view: one table, refreshed twice a second, that says what the loop is doing
(traffic, hard cases, labels, versions, latency, agreement, budget, quality, components) and
what the teacher is."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from broadfast.core.settings import Settings
from broadfast.demo.report import TEACHER_MEANING, Tally, budget_line, quality_line, quality_summary
from broadfast.demo.shift import Shift, shift_line
from broadfast.demo.supervisor import Component


class LiveView:
    """Renders the tally of a running demo; reads the labelling budget from Redis."""

    def __init__(self, settings: Settings, *, teacher: str, duration_s: float, components: Sequence[Component], shift: Shift | None = None) -> None:
        self.settings = settings
        self.teacher = teacher
        self.duration_s = duration_s
        self.components = components
        self.shift = shift
        self._redis: Any = None

    def budget(self) -> dict[str, Any] | None:
        """The labelling budget as the stream and the labelers share it in Redis (None when unreadable)."""
        from broadfast.core.budget import budget_status

        try:
            if self._redis is None:
                from broadfast.core.connections import redis_client

                self._redis = redis_client(self.settings, timeout_s=1)
            return budget_status(self._redis, self.settings)
        except Exception:  # noqa: BLE001 - the view must not die with Redis
            return None

    def render(self, t: Tally, started: float, started_wall: float) -> Any:
        from rich.table import Table

        with t.lock:
            counts = dict(t.counts)
            lat = list(t.server_latency_ms[-5000:])
            versions = list(t.version_first_ts)
            agree = list(t.agreement)
            models = len(t.models)
        elapsed = time.monotonic() - started if started else 0.0
        table = Table(title=f"broadfast demo — {elapsed:5.0f} s / {self.duration_s:.0f} s", show_header=False, min_width=60)
        table.add_column("what", style="bold")
        table.add_column("value")
        if self.shift is not None:
            table.add_row("traffic", shift_line(self.shift, t, started_wall, self.settings))
        table.add_row("pairs scored", f"{counts.get('scored', 0):,}  ({counts.get('scored', 0) / max(elapsed, 1e-9):,.1f}/s)")
        table.add_row("hard cases", f"{counts.get('hardcases', 0):,}")
        table.add_row("teacher labels", f"{counts.get('labels', 0):,}")
        table.add_row("models published", f"{models}")
        table.add_row("versions served", ", ".join(versions[-4:]) or "—")
        if lat:
            table.add_row("scoring latency (server)", f"p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms")
        table.add_row("teacher–student agreement", f"{np.mean(agree):.0%} of {len(agree)}" if agree else "—")
        table.add_row("labelling budget", budget_line(self.budget()))
        table.add_row("teacher", f"{self.teacher}: {TEACHER_MEANING.get(self.teacher, '')}")
        table.add_row("student quality (validation)", quality_line(quality_summary(t, self.teacher)))
        table.add_row("dead letters / alerts", f"{counts.get('deadletter', 0)} / {counts.get('alerts', 0)}")
        table.add_row("components", "  ".join(f"{c.name}: {c.status()}" for c in self.components))
        return table

    def show_until(self, t: Tally, started: float, started_wall: float, until: float, stop: threading.Event, live: bool) -> None:
        """Refresh the view until the monotonic time ``until`` (or ``stop``); without ``live``, just wait."""
        if not live:
            while time.monotonic() < until and not stop.is_set():
                time.sleep(0.5)
            return
        from rich.live import Live

        with Live(self.render(t, started, started_wall), refresh_per_second=2, transient=False) as view:
            while time.monotonic() < until and not stop.is_set():
                time.sleep(0.5)
                view.update(self.render(t, started, started_wall))
