"""The demo: the whole online loop on the embedded stack, with a live view and a summary.

``broadfast demo`` starts, in order: the embedded broker and Redis; a first student
(bootstrapped from a small human-labelled slice when the registry has none); the scoring
API; the stream app; the labeling worker; the online trainer; the monitor — each its own
``broadfast …`` process, as in production — then replays traffic from a data set through
the scoring API for ``--duration`` seconds while a live terminal view shows traffic, hard
cases, labels, versions, swaps, latency and teacher–student agreement. At the end it
writes a drift report, prints a summary (and writes it as JSON with ``--summary``) and
shuts everything down, leaving no process behind. Ctrl-C shuts down the same way.

The tally of the topics and the figures of the view and the summary are in
:mod:`broadfast.demo_report`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from broadfast.demo_report import TEACHER_MEANING, Tally, Watcher, budget_line, freshness, percentile, quality_line, quality_summary, version_quality
from broadfast.demo_shift import SHIFT_MAX_ADS, Shift, shift_line, shift_summary
from broadfast.errors import BroadfastError
from broadfast.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    duration_s: float = 300.0
    teacher: str = "oracle"  # see demo_teacher()
    data: Path | None = None
    summary: Path | None = None
    rate: float = 5.0  # search requests per second
    student: str = "minilm"  # or "tiny" (a small random encoder: CI)
    student_layers: int | None = 3  # first student's encoder layers: None = all of the encoder's; fewer = its bottom ones (training/shrink.py)
    bootstrap_pairs: int = 600
    seed: int = 0
    drain_s: float = 10.0
    live: bool = True
    shift_to: Path | None = None  # a second data set the traffic switches to (broadfast/demo_shift.py)
    shift_after_s: float = 180.0


# -- components ------------------------------------------------------------------------------
class Component:
    """One ``broadfast …`` child process with its log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.argv = [sys.executable, "-m", "broadfast.cli", *args]
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


def demo_teacher(flag: str | None, settings: Settings) -> str:
    """The demo's teacher: the flag; else BROADFAST_TEACHER_BACKEND when set; else vLLM when
    BROADFAST_TEACHER_URL is set; else the oracle, so that a new user's demo shows a student that learns."""
    if flag:
        return flag
    if "teacher_backend" in settings.model_fields_set:
        return settings.teacher_backend
    return "vllm" if settings.teacher_url else "oracle"


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
        self.backend: dict[str, Any] | None = None  # the champion's inference backend, read from the API at the end
        self.shift: Shift | None = None

    # -- set-up --------------------------------------------------------------------------
    def _stack(self) -> tuple[Settings, dict[str, str]]:
        from streams.stack import EmbeddedStack

        self.stack = EmbeddedStack(self.base.model_copy(update={"home": self.home}))
        state, _ = self.stack.up()
        defaults = {k: v for k, v in self.DEMO_DEFAULTS.items() if k not in self.base.model_fields_set}
        settings = self.base.model_copy(update=defaults | {
            "home": self.home, "kafka_bootstrap": state.env["BROADFAST_KAFKA_BOOTSTRAP"], "kafka_flavor": "tansu",
            "redis_url": state.env["BROADFAST_REDIS_URL"],
        })  # fmt: skip
        return settings, dict(state.env)

    def _forget_trainer_state(self) -> None:
        """The embedded broker starts empty, so an earlier run's trainer checkpoint (label offsets of a
        topic that no longer exists) would skip this run's first labels: start the trainer afresh. The
        registry is kept, and its champion is this run's first student."""
        import shutil

        checkpoint = self.home / "trainer"
        if checkpoint.exists():
            log.info("removing the trainer state of an earlier demo run (%s): the embedded broker starts empty", checkpoint)
            shutil.rmtree(checkpoint)

    def _val_files(self, data: Path) -> list[Path]:
        """The data sets the oracle answers from and the trainer's fixed slice is drawn from: both, in a shift."""
        return [data] if self.shift is None else [data, self.shift.target]

    def _data(self) -> Path:
        data = self.config.data or self.base.data
        if not Path(data).exists():
            raise BroadfastError(f"demo data set not found: {data} (set --data or BROADFAST_DATA)")
        return Path(data)

    def _bootstrap_student(self, settings: Settings, data: Path) -> tuple[str, dict[str, Any]]:
        """The registry's champion, or a first student trained on a small human-labelled slice.

        Returns its version and its quality (validation figures on the online trainer's slice).
        """
        from training.registry import Registry

        registry = Registry(settings)
        champion = registry.champion()
        if champion is not None:
            log.info("serving the registry's champion %s", champion)
            manifest = registry.show(champion)
            return champion, version_quality(manifest.metrics, manifest.trained_on, manifest.created_at)
        from streams.datasets import load_pairs
        from training.distill import TrainConfig, train_offline_frame
        from training.gate import Gate
        from training.online import is_held_out, validation_frame
        from training.student import StudentConfig
        from training.targets import human_targets

        source = data.with_name("train.parquet") if data.with_name("train.parquet").exists() else data
        df = load_pairs(source, require_grade=True)
        df = df[[not is_held_out(q, settings.online_val_share) for q in df["query"]]]
        df = df.sample(n=min(self.config.bootstrap_pairs, len(df)), random_state=self.config.seed).reset_index(drop=True)
        kind = "relevance" if "relevance" in df.columns else "grade"
        cfg = StudentConfig.tiny() if self.config.student == "tiny" else StudentConfig.minilm(max_length=64)
        first = None
        if self.config.student_layers is not None and self.config.student_layers < cfg.layers:
            from training.shrink import shrink_student
            from training.student import build_student

            first, _ = shrink_student(build_student(cfg, "cpu"), self.config.student_layers)  # the encoder's bottom layers
            cfg = first.config
        train_cfg = TrainConfig(epochs=1, batch_size=16, checkpoint=False, progress=self.config.live, seed=self.config.seed, device="cpu")
        log.info("bootstrapping a first %s student (%d encoder layers) on %d human-labelled pairs of %s", self.config.student, cfg.layers, len(df), source)
        out = self.home / "bootstrap-student"
        teachers = {f"human-{kind}({source.parent.name}/{source.name})": len(df)}
        student, _ = train_offline_frame(df, human_targets(df, kind), train_cfg, cfg, out, resume=False, trained_on={"bootstrap": str(source), "pairs": len(df), "teachers": teachers}, student=first)
        # measured exactly as the online trainer's gate measures every later version
        val = validation_frame(self._val_files(data), settings.online_val_share, settings.online_val_pairs)
        measured = Gate(val).measure(student)
        metrics = {f"val_{k}": v for k, v in measured.metrics.items() if np.isfinite(v)}
        log.info("first student: validation spearman %.4f, ndcg@10 %.4f on %d pairs", measured.metrics.get("spearman", float("nan")), measured.metrics.get("ndcg@10", float("nan")), len(val))
        manifest = registry.publish(out, champion=True, announce=False, metrics=metrics)
        return manifest.version, version_quality(manifest.metrics, manifest.trained_on, manifest.created_at)

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
        env |= {f"BROADFAST_{k.upper()}": str(v) for k, v in self.DEMO_DEFAULTS.items() if k not in self.base.model_fields_set}
        env |= {"BROADFAST_HOME": str(self.home), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        if self.base.admin_token is not None:
            env["BROADFAST_ADMIN_TOKEN"] = self.base.admin_token.get_secret_value()
        return env | extra

    def _features(self, env: dict[str, str]) -> None:
        """Register the Feast repo and load the ad attributes, so the stream can push its counters."""
        for step in (["features", "apply"], ["features", "materialize"]):
            proc = subprocess.run([sys.executable, "-m", "broadfast.cli", *step], env=env, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise BroadfastError(f"`broadfast {' '.join(step)}` failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
            log.info("broadfast %s: done", " ".join(step))

    def _wait_ready(self, url: str, serve: Component, timeout_s: float = 180.0) -> None:
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

    @staticmethod
    def _serving_backend(url: str) -> dict[str, Any] | None:
        """The inference backend of the champion the API serves at the end (its ``/readyz``)."""
        import httpx

        try:
            return httpx.get(url + "/readyz", timeout=5).json().get("backend")
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("could not read the serving backend from %s/readyz: %s", url, exc)
            return None

    # -- run -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from streams.stack import free_port

        self.logs.mkdir(parents=True, exist_ok=True)
        data = self._data()
        if self.config.shift_to is not None:
            self.shift = Shift(data, Path(self.config.shift_to), self.config.shift_after_s)
        settings, stack_env = self._stack()
        self.settings = settings
        try:
            self._forget_trainer_state()
            first_version, first_quality = self._bootstrap_student(settings, data)
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            env = self._env(
                stack_env,
                BROADFAST_SCORING_URL=url, BROADFAST_SERVE_PORT=str(port), BROADFAST_TEACHER_BACKEND=self.config.teacher,
                BROADFAST_TEACHER_ORACLE_DATA=",".join(str(p) for p in self._val_files(data)), BROADFAST_DATA=str(data),
            )  # fmt: skip
            self._features(env)
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
            self._wait_ready(url, serve)
            watcher = Watcher(settings)
            watcher.tally.quality[first_version] = first_quality
            watcher.start()
            self._traffic(settings, data, url, watcher)
            watcher.stop_event.set()
            watcher.join(timeout=10)
            self.backend = self._serving_backend(url)
            reports = self._drift_report(env)
            return self._summary(watcher.tally, reports)
        finally:
            self.shutdown()

    def _traffic(self, settings: Settings, data: Path, url: str, watcher: Watcher) -> None:
        from streams.bus import EventBus
        from streams.datasets import load_pairs
        from streams.replay import HttpScorer, Replayer, plan_requests, shifted

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
            self._live(watcher, until=self.started + self.config.duration_s)
        finally:
            stop.set()
            thread.join(timeout=30)
            scorer.close()
            bus.close()
        self.replay_stats = result.get("stats")
        drain_until = time.monotonic() + self.config.drain_s
        while time.monotonic() < drain_until:
            time.sleep(0.5)

    def _live(self, watcher: Watcher, until: float) -> None:
        if not self.config.live:
            while time.monotonic() < until and not self.stop_event.is_set():
                time.sleep(0.5)
            return
        from rich.live import Live

        with Live(self._view(watcher), refresh_per_second=2, transient=False) as live:
            while time.monotonic() < until and not self.stop_event.is_set():
                time.sleep(0.5)
                live.update(self._view(watcher))

    def _budget(self) -> dict[str, Any] | None:
        """The labelling budget as the stream and the labelers share it in Redis (None when unreadable)."""
        from streams.budget import budget_status

        try:
            if getattr(self, "_redis", None) is None:
                import redis

                self._redis = redis.Redis.from_url(self.settings.redis_url, socket_timeout=1)
            return budget_status(self._redis, self.settings)
        except Exception:  # noqa: BLE001 - the view must not die with Redis
            return None

    def _view(self, watcher: Watcher) -> Any:
        from rich.table import Table

        t = watcher.tally
        with t.lock:
            counts = dict(t.counts)
            lat = list(t.server_latency_ms[-5000:])
            versions = list(t.version_first_ts)
            agree = list(t.agreement)
            models = len(t.models)
        elapsed = time.monotonic() - self.started if self.started else 0.0
        table = Table(title=f"broadfast demo — {elapsed:5.0f} s / {self.config.duration_s:.0f} s", show_header=False, min_width=60)
        table.add_column("what", style="bold")
        table.add_column("value")
        if self.shift is not None:
            table.add_row("traffic", shift_line(self.shift, t, self.started_wall, self.settings))
        table.add_row("pairs scored", f"{counts.get('scored', 0):,}  ({counts.get('scored', 0) / max(elapsed, 1e-9):,.1f}/s)")
        table.add_row("hard cases", f"{counts.get('hardcases', 0):,}")
        table.add_row("teacher labels", f"{counts.get('labels', 0):,}")
        table.add_row("models published", f"{models}")
        table.add_row("versions served", ", ".join(versions[-4:]) or "—")
        if lat:
            table.add_row("scoring latency (server)", f"p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms")
        table.add_row("teacher–student agreement", f"{np.mean(agree):.0%} of {len(agree)}" if agree else "—")
        table.add_row("labelling budget", budget_line(self._budget()))
        table.add_row("teacher", f"{self.config.teacher}: {TEACHER_MEANING.get(self.config.teacher, '')}")
        table.add_row("student quality (validation)", quality_line(quality_summary(t, self.config.teacher)))
        table.add_row("dead letters / alerts", f"{counts.get('deadletter', 0)} / {counts.get('alerts', 0)}")
        table.add_row("components", "  ".join(f"{c.name}: {c.status()}" for c in self.components))
        return table

    def _drift_report(self, env: dict[str, str]) -> list[str]:
        out = self.home / "drift" / time.strftime("%Y%m%d-%H%M%S")
        proc = subprocess.run([sys.executable, "-m", "broadfast.cli", "drift", "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            log.warning("the drift report failed (exit %d): %s", proc.returncode, proc.stderr[-1500:])
        reports = sorted(str(p) for p in (self.home / "drift").rglob("*.html")) if (self.home / "drift").exists() else []
        monitor_dir = self.home / "monitoring"
        if monitor_dir.exists():
            reports += sorted(str(p) for p in monitor_dir.rglob("*.html"))
        return reports

    def _summary(self, tally: Tally, reports: list[str]) -> dict[str, Any]:
        died = [c.name for c in self.components if not c.alive]
        for component in self.components:
            if component.name in died:
                log.error("%s exited during the demo (%s); its log ends:\n%s", component.name, component.status(), component.tail(1500))
        stats = self.replay_stats
        from training.online import is_held_out

        fresh = freshness(tally, lambda q: is_held_out(q, self.settings.online_val_share))
        client_lat = list(stats.latencies_ms) if stats is not None else []
        summary = {
            "duration_s": self.config.duration_s,
            "teacher": self.config.teacher,
            "requests": stats.requests if stats else 0,
            "failed_requests": stats.scoring_failed if stats else 0,
            "events_lost": stats.events_lost if stats else 0,  # the frontend's requests and clicks the broker never acknowledged
            "pairs_scored": tally.counts.get("scored", 0),
            "hard_cases": tally.counts.get("hardcases", 0),
            "labels": tally.counts.get("labels", 0),
            "labels_by_perspectives": {str(k): v for k, v in sorted(tally.perspectives.items())},
            "models_published": len(tally.models),
            "versions_served": list(tally.version_first_ts),
            "swaps": max(0, len(tally.version_first_ts) - 1),
            "serving_backend": self.backend,  # the champion's inference backend at the end (BROADFAST_SERVE_BACKEND)
            "serving_p99_ms": percentile(tally.server_latency_ms, 99),
            "serving_p50_ms": percentile(tally.server_latency_ms, 50),
            "client_p99_ms": percentile(client_lat, 99),
            "teacher_student_agreement": float(np.mean(tally.agreement)) if tally.agreement else None,
            "freshness_s": {
                "p50": percentile([f for f, _ in fresh], 50), "p90": percentile([f for f, _ in fresh], 90), "n": len(fresh),
                "to_label_p50": percentile([w for _, w in fresh], 50), "label_to_served_p50": percentile([f - w for f, w in fresh], 50),
            },  # fmt: skip
            "dead_letters": tally.counts.get("deadletter", 0),
            "alerts": [a.kind for a in tally.alerts],
            "quality": quality_summary(tally, self.config.teacher),
            "labelling": self._budget(),
            "drift_reports": reports,
            **({"shift": shift_summary(self.settings, self.shift, tally)} if self.shift is not None else {}),
            "components": {c.name: c.status() for c in self.components},
            "components_died": died,
            "logs": str(self.logs),
        }
        if self.config.summary is not None:
            self.config.summary.parent.mkdir(parents=True, exist_ok=True)
            self.config.summary.write_text(json.dumps(summary, indent=2))
        return summary

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
