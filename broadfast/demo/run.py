"""The demo: the whole online loop on the embedded stack, with a live view and a summary.

``broadfast demo`` starts, in order: the embedded broker and Redis; a first student
(bootstrapped from a small human-labelled slice when the registry has none); the scoring
API; the stream app; the labeling worker; the online trainer; the monitor — each its own
``broadfast …`` process, as in production — then replays traffic from a data set through
the scoring API for ``--duration`` seconds while a live terminal view shows traffic, hard
cases, labels, versions, swaps, latency and teacher–student agreement. At the end it
writes a drift report, prints a summary (and writes it as JSON with ``--summary``) and
shuts everything down, leaving no process behind. Ctrl-C shuts down the same way.

Its parts: :mod:`~broadfast.demo.supervisor` (the child processes), :mod:`~broadfast.demo.bootstrap`
(the first student, the Feast repo), :mod:`~broadfast.demo.view` (the live view),
:mod:`~broadfast.demo.summary` (the summary), :mod:`~broadfast.demo.report` (the tally of the topics and
its figures) and :mod:`~broadfast.demo.shift` (the simulated traffic shift). This module runs them in order.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broadfast.core.errors import BroadfastError
from broadfast.core.settings import Settings
from broadfast.demo.bootstrap import bootstrap_student, forget_trainer_state, set_up_features
from broadfast.demo.report import Watcher
from broadfast.demo.shift import SHIFT_MAX_ADS, Shift
from broadfast.demo.summary import drift_reports, summarise
from broadfast.demo.supervisor import Component, serving_backend, wait_ready
from broadfast.demo.view import LiveView

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    duration_s: float = 300.0
    teacher: str = "oracle"  # see demo_teacher()
    data: Path | None = None
    summary: Path | None = None
    rate: float = 5.0  # search requests per second
    student: str = "minilm"  # or "tiny" (a small random encoder: CI)
    student_layers: int | None = 3  # first student's encoder layers: None = all of the encoder's; fewer = its bottom ones (broadfast/training/shrink.py)
    bootstrap_pairs: int = 600
    seed: int = 0
    drain_s: float = 10.0
    live: bool = True
    shift_to: Path | None = None  # a second data set the traffic switches to (broadfast/demo/shift.py)
    shift_after_s: float = 180.0


def demo_teacher(flag: str | None, settings: Settings) -> str:
    """The demo's teacher: the flag; else BROADFAST_TEACHER_BACKEND when set; else vLLM when
    BROADFAST_TEACHER_URL is set; else the oracle, so that a new user's demo shows a student that learns."""
    if flag:
        return flag
    if "teacher_backend" in settings.given():
        return settings.teacher.teacher_backend
    return "vllm" if settings.teacher.teacher_url else "oracle"


# -- the demo ------------------------------------------------------------------------------------
class Demo:
    def __init__(self, settings: Settings, config: DemoConfig) -> None:
        self.base = settings
        self.config = config
        self.home = settings.home / "demo"
        self.logs = self.home / "logs"
        self.components: list[Component] = []
        self.stop_event = threading.Event()
        self.started = 0.0
        self.started_wall = 0.0
        self.replay_stats: Any = None
        self.shift: Shift | None = None

    # -- set-up --------------------------------------------------------------------------
    def _stack(self) -> tuple[Settings, dict[str, str]]:
        from broadfast.devstack.stack import EmbeddedStack

        self.stack = EmbeddedStack(self.base.model_copy(update={"home": self.home}))
        state, _ = self.stack.up()
        defaults = {k: v for k, v in self.DEMO_DEFAULTS.items() if k not in self.base.given()}
        settings = state.settings(self.base, **defaults, home=self.home)
        return settings, dict(state.env)

    def _val_files(self, data: Path) -> list[Path]:
        """The data sets the oracle answers from and the trainer's fixed slice is drawn from: both, in a shift."""
        return [data] if self.shift is None else [data, self.shift.target]

    def _data(self) -> Path:
        data = self.config.data or self.base.data
        if not Path(data).exists():
            raise BroadfastError(f"demo data set not found: {data} (set --data or BROADFAST_DATA)")
        return Path(data)

    # Demo defaults a user can override with the variable:
    # - publish at most every 10 s: a label waits for the next publish, so this bounds freshness;
    # - admit at most 8 hard cases/s: on this 2-core machine the 3-layer student's trainer (one core,
    #   two passes a label, a quarter of each batch replayed) keeps up with that many (rounds of ~32
    #   labels, ~2 s of training each); the oracle answers at once, so a higher rate would only queue
    #   labels in front of the trainer. At 4/s a 5-minute demo gave the trainer 1,212 labels and
    #   its student +0.089 Spearman; at 8/s 2,400 labels and +0.261 (docs/demo.md);
    # - a monitoring round a minute.
    # The online learner keeps its own defaults (benchmarks/online.py).
    DEMO_DEFAULTS: dict[str, Any] = {"online_publish_every_s": 10.0, "stream_budget_max_per_s": 8.0, "monitor_interval_s": 60.0}

    def _env(self, stack_env: dict[str, str], **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROADFAST_")}
        env |= self.base.public_env() | stack_env
        env |= {f"BROADFAST_{k.upper()}": str(v) for k, v in self.DEMO_DEFAULTS.items() if k not in self.base.given()}
        env |= {"BROADFAST_HOME": str(self.home), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        if self.base.serving.admin_token is not None:
            env["BROADFAST_ADMIN_TOKEN"] = self.base.serving.admin_token.get_secret_value()
        return env | extra

    # -- run -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from broadfast.devstack.stack import free_port

        self.logs.mkdir(parents=True, exist_ok=True)
        data = self._data()
        if self.config.shift_to is not None:
            self.shift = Shift(data, Path(self.config.shift_to), self.config.shift_after_s)
        settings, stack_env = self._stack()
        try:
            forget_trainer_state(self.home)
            first_version, first_quality = bootstrap_student(
                settings, data, self._val_files(data), self.home / "bootstrap-student", student=self.config.student,
                layers=self.config.student_layers, pairs=self.config.bootstrap_pairs, seed=self.config.seed, progress=self.config.live,
            )  # fmt: skip
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            env = self._env(
                stack_env,
                BROADFAST_SCORING_URL=url, BROADFAST_SERVE_PORT=str(port), BROADFAST_TEACHER_BACKEND=self.config.teacher,
                BROADFAST_TEACHER_ORACLE_DATA=",".join(str(p) for p in self._val_files(data)), BROADFAST_DATA=str(data),
            )  # fmt: skip
            set_up_features(env)
            serve = Component("serve", ["serve", "--port", str(port)], env, self.logs)
            self.components = [
                serve,
                Component("stream", ["stream"], env | {"BROADFAST_STREAM_WEB_PORT": "0"}, self.logs),
                Component("label", ["label", "--teacher", self.config.teacher], env, self.logs),
                Component("train", ["train", "online", *(arg for p in self._val_files(data) for arg in ("--val-data", str(p)))], env, self.logs),
                Component("monitor", ["monitor"], env, self.logs),
            ]
            for component in self.components:
                component.start()
            self.view = LiveView(settings, teacher=self.config.teacher, duration_s=self.config.duration_s, components=self.components, shift=self.shift)
            wait_ready(url, serve)
            watcher = Watcher(settings)
            watcher.tally.quality[first_version] = first_quality
            watcher.start()
            self._traffic(settings, data, url, watcher)
            watcher.stop_event.set()
            watcher.join(timeout=10)
            backend = serving_backend(url)
            reports = drift_reports(self.home, env)
            return summarise(
                watcher.tally, settings, duration_s=self.config.duration_s, teacher=self.config.teacher, replay_stats=self.replay_stats,
                backend=backend, budget=self.view.budget(), reports=reports, components=self.components, shift=self.shift, logs=self.logs,
                out=self.config.summary,
            )  # fmt: skip
        finally:
            self.shutdown()

    def _traffic(self, settings: Settings, data: Path, url: str, watcher: Watcher) -> None:
        from broadfast.core.bus import EventBus
        from broadfast.core.datasets import load_pairs
        from broadfast.simulation.replay import HttpScorer, Replayer, plan_requests, shifted

        df = load_pairs(data, require_grade=True)
        shift = self.shift
        scorer = HttpScorer(url)
        bus = EventBus(settings)
        stop = threading.Event()
        result: dict[str, Any] = {}

        def replay() -> None:
            if shift is None:
                planned = plan_requests(df, limit=None, seed=self.config.seed)
            else:
                old = plan_requests(df, limit=None, seed=self.config.seed, max_ads=SHIFT_MAX_ADS)
                new = plan_requests(load_pairs(shift.target, require_grade=True), limit=None, seed=self.config.seed, max_ads=SHIFT_MAX_ADS)
                planned = shifted(old, new, after_s=shift.after_s, on_shift=shift.mark)
            result["stats"] = Replayer(bus, scorer=scorer, seed=self.config.seed).run(planned, rate=self.config.rate, stop=stop, concurrency=2)

        thread = threading.Thread(target=replay, name="demo-replay", daemon=True)
        self.started = time.monotonic()
        self.started_wall = time.time()
        thread.start()
        try:
            self.view.show_until(watcher.tally, self.started, self.started_wall, self.started + self.config.duration_s, self.stop_event, self.config.live)
        finally:
            stop.set()
            thread.join(timeout=30)
            scorer.close()
            bus.close()
        self.replay_stats = result.get("stats")
        drain_until = time.monotonic() + self.config.drain_s
        while time.monotonic() < drain_until:
            time.sleep(0.5)

    def shutdown(self) -> None:
        for component in reversed(self.components):
            try:
                component.stop()
            except Exception:  # noqa: BLE001 - keep stopping the others
                log.exception("could not stop %s", component.name)
        stack = getattr(self, "stack", None)
        if stack is not None:
            stack.down()


def run_demo(settings: Settings, config: DemoConfig) -> dict[str, Any]:
    """Run the demo; Ctrl-C (or SIGTERM) stops traffic early and still shuts everything down."""
    demo = Demo(settings, config)

    def on_signal(signum: int, frame: Any) -> None:
        log.warning("signal %d: stopping the demo", signum)
        demo.stop_event.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return demo.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
