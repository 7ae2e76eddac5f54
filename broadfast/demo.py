"""The demo: the whole online loop on the embedded stack, with a live view and a summary.

``broadfast demo`` starts, in order: the embedded broker and Redis; a first student
(bootstrapped from a small human-labelled slice when the registry has none); the scoring
API; the stream app; the labeling worker; the online trainer; the monitor — each its own
``broadfast …`` process, as in production — then replays traffic from a data set through
the scoring API for ``--duration`` seconds while a live terminal view shows traffic, hard
cases, labels, versions, swaps, latency and teacher–student agreement. At the end it
writes a drift report, prints a summary (and writes it as JSON with ``--summary``) and
shuts everything down, leaving no process behind. Ctrl-C shuts down the same way.

Freshness: for each label, the time from its pair's first scoring to the first response
served by a model whose training included that label (a version whose
``trained_on.offsets`` lie past the label's offset).
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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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
    bootstrap_pairs: int = 600
    seed: int = 0
    drain_s: float = 10.0
    live: bool = True


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


# -- what happened: a tally of the topics ---------------------------------------------------------
@dataclass
class Tally:
    counts: Counter = field(default_factory=Counter)
    version_first_ts: dict[str, float] = field(default_factory=dict)
    server_latency_ms: list[float] = field(default_factory=list)
    student_probs: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    agreement: list[bool] = field(default_factory=list)
    perspectives: Counter = field(default_factory=Counter)
    labels: list[tuple[int, int, float | None]] = field(default_factory=list)  # partition, offset, first_scored_ts
    models: list[Any] = field(default_factory=list)
    alerts: list[Any] = field(default_factory=list)
    teacher_ids: Counter = field(default_factory=Counter)
    quality: dict[str, dict[str, Any]] = field(default_factory=dict)  # version -> validation metrics, teachers
    lock: threading.Lock = field(default_factory=threading.Lock)


class Watcher(threading.Thread):
    """Reads every topic from the start (its own consumer, no group) into a :class:`Tally`."""

    TOPICS = ("scored", "hardcases", "labels", "models", "alerts", "deadletter")

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="demo-watcher", daemon=True)
        self.settings = settings
        self.tally = Tally()
        self.stop_event = threading.Event()

    def run(self) -> None:
        from kafka import KafkaConsumer

        from broadfast.errors import EventValidationError
        from streams.bus import short_name
        from streams.events import decode

        consumer = KafkaConsumer(*(self.settings.topic(t) for t in self.TOPICS), bootstrap_servers=self.settings.kafka_bootstrap, auto_offset_reset="earliest", enable_auto_commit=False, group_id=None)
        try:
            while not self.stop_event.is_set():
                for tp, records in consumer.poll(timeout_ms=500, max_records=2000).items():
                    topic = short_name(self.settings, tp.topic)
                    for record in records:
                        try:
                            event = decode(topic, record.value, max_bytes=self.settings.max_event_bytes)
                        except EventValidationError:
                            continue
                        self._count(topic, event, record.partition, record.offset)
        finally:
            consumer.close()

    def _count(self, topic: str, event: Any, partition: int, offset: int) -> None:
        t = self.tally
        with t.lock:
            t.counts[topic] += 1
            if topic == "scored":
                t.version_first_ts.setdefault(event.model_version, event.ts)
                t.server_latency_ms.append(event.latency_ms)
            elif topic == "hardcases":
                t.student_probs[event.pair_id] = event.student_probs
            elif topic == "labels":
                t.labels.append((partition, offset, event.first_scored_ts))
                t.teacher_ids[event.teacher_id] += 1
                t.perspectives[len(event.perspectives)] += 1
                student = t.student_probs.get(event.pair_id)
                if student is not None:
                    t.agreement.append(int(np.argmax(student)) == int(np.argmax(event.probs)))
            elif topic == "models":
                t.models.append(event)
                t.quality[event.version] = version_quality(event.metrics, event.trained_on, event.ts)
            elif topic == "alerts":
                t.alerts.append(event)


def version_quality(metrics: dict[str, float], trained_on: dict[str, Any], ts: float) -> dict[str, Any]:
    """A version's validation figures (the online trainer's fixed slice) and the teachers of its labels."""
    return {
        "spearman": metrics.get("val_spearman"), "ndcg@10": metrics.get("val_ndcg@10"),
        "teachers": dict((trained_on or {}).get("teachers") or {}), "published_ts": ts,
    }  # fmt: skip


def quality_summary(tally: Tally, teacher: str) -> dict[str, Any]:
    """Each version's validation quality; the first, best and last *served* versions; the teachers."""
    with tally.lock:
        quality = {v: dict(q) for v, q in tally.quality.items()}
        served = list(tally.version_first_ts)
        teacher_ids = dict(tally.teacher_ids)
    versions = [{"version": v, "served": v in served, **q} for v, q in sorted(quality.items(), key=lambda kv: kv[1]["published_ts"])]
    scored = [v for v in versions if v["served"] and v["spearman"] is not None]
    first = next((v for v in scored if v["version"] == served[0]), scored[0] if scored else None) if served else None
    last = next((v for v in reversed(scored) if v["version"] == served[-1]), scored[-1] if scored else None) if served else None
    best = max(scored, key=lambda v: v["spearman"]) if scored else None
    gain = last["spearman"] - first["spearman"] if first and last else None
    return {
        "teacher": teacher, "teacher_ids": teacher_ids, "meaning": TEACHER_MEANING.get(teacher, ""),
        "versions": versions, "first": first, "best": best, "last": last, "spearman_gain": gain,
    }  # fmt: skip


TEACHER_MEANING = {
    "oracle": "a simulated annotator answering with the human relevance judgements of the data set — labels with real signal, "
    "so the student should get better; it stands in for a strong LLM teacher on a GPU",
    "transformers": "a tiny local LLM (SmolLM2-135M-Instruct) reasoning from three perspectives — real LLM labels, but a model "
    "this small carries almost no relevance signal (Spearman ≈ 0 with human grades), so the student is not expected to improve",
    "vllm": "the LLM behind BROADFAST_TEACHER_URL (vLLM's OpenAI API), reasoning from three perspectives — the student improves "
    "as far as that model's labels carry signal",
}


def quality_line(q: dict[str, Any]) -> str:
    """first → best → last served version, with validation Spearman / NDCG@10, and what the change means."""

    def fig(v: dict[str, Any] | None) -> str:
        if v is None:
            return "—"
        ndcg = v.get("ndcg@10")
        return f"{v['version']} {v['spearman']:.3f} / {'—' if ndcg is None else f'{ndcg:.3f}'}"

    if q["first"] is None:
        return "— (no version with validation figures served yet)"
    line = f"first {fig(q['first'])} · best {fig(q['best'])} · serving {fig(q['last'])}"
    gain = q["spearman_gain"]
    if gain is not None and q["last"]["version"] != q["first"]["version"]:
        line += f" — {gain:+.3f} Spearman since the first: " + ("the student got better on queries it never trained on" if gain >= 0.05 else "no clear change yet (the slice's noise is a few hundredths)" if gain > -0.05 else "worse than the first")
    return line


def demo_teacher(flag: str | None, settings: Settings) -> str:
    """The demo's teacher: the flag; else BROADFAST_TEACHER_BACKEND when set; else vLLM when
    BROADFAST_TEACHER_URL is set; else the oracle, so that a new user's demo shows a student that learns."""
    if flag:
        return flag
    if "teacher_backend" in settings.model_fields_set:
        return settings.teacher_backend
    return "vllm" if settings.teacher_url else "oracle"


def freshness(tally: Tally) -> list[float]:
    """Seconds from a labelled pair's first scoring to the first response of a model trained on its label."""
    served = []
    for model in sorted(tally.models, key=lambda m: m.ts):
        offsets = {int(p): int(o) for p, o in (model.trained_on.get("offsets") or {}).items()}
        first = tally.version_first_ts.get(model.version)
        if offsets and first is not None:
            served.append((offsets, first))
    out = []
    for partition, offset, first_scored in tally.labels:
        if first_scored is None:
            continue
        for offsets, first in served:
            if offsets.get(partition, 0) > offset:
                out.append(max(0.0, first - first_scored))
                break
    return out


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


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
        self.replay_stats: Any = None

    # -- set-up --------------------------------------------------------------------------
    def _stack(self) -> tuple[Settings, dict[str, str]]:
        from streams.stack import EmbeddedStack

        self.stack = EmbeddedStack(self.base.model_copy(update={"home": self.home}))
        state, _ = self.stack.up()
        settings = self.base.model_copy(update={
            "home": self.home, "kafka_bootstrap": state.env["BROADFAST_KAFKA_BOOTSTRAP"], "kafka_flavor": "tansu",
            "redis_url": state.env["BROADFAST_REDIS_URL"],
        })  # fmt: skip
        return settings, dict(state.env)

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
        from training.online import is_held_out, validation_slice
        from training.student import StudentConfig
        from training.targets import human_targets

        source = data.with_name("train.parquet") if data.with_name("train.parquet").exists() else data
        df = load_pairs(source, require_grade=True)
        df = df[[not is_held_out(q, settings.online_val_share) for q in df["query"]]]
        df = df.sample(n=min(self.config.bootstrap_pairs, len(df)), random_state=self.config.seed).reset_index(drop=True)
        kind = "relevance" if "relevance" in df.columns else "grade"
        cfg = StudentConfig.tiny() if self.config.student == "tiny" else StudentConfig.minilm(max_length=64)
        train_cfg = TrainConfig(epochs=1, batch_size=16, checkpoint=False, progress=self.config.live, seed=self.config.seed, device="cpu")
        log.info("bootstrapping a first %s student on %d human-labelled pairs of %s", self.config.student, len(df), source)
        out = self.home / "bootstrap-student"
        teachers = {f"human-{kind}({source.parent.name}/{source.name})": len(df)}
        student, _ = train_offline_frame(df, human_targets(df, kind), train_cfg, cfg, out, resume=False, trained_on={"bootstrap": str(source), "pairs": len(df), "teachers": teachers})
        # measured exactly as the online trainer's gate measures every later version
        val = validation_slice(load_pairs(data, require_grade=True), settings.online_val_share, settings.online_val_pairs)
        measured = Gate(val).measure(student)
        metrics = {f"val_{k}": v for k, v in measured.metrics.items() if np.isfinite(v)}
        log.info("first student: validation spearman %.4f, ndcg@10 %.4f on %d pairs", measured.metrics.get("spearman", float("nan")), measured.metrics.get("ndcg@10", float("nan")), len(val))
        manifest = registry.publish(out, champion=True, announce=False, metrics=metrics)
        return manifest.version, version_quality(manifest.metrics, manifest.trained_on, manifest.created_at)

    # Demo defaults a user can override with the variable: publish at most every 10 s (freshness: a
    # label waits for the next publish), and a monitoring round a minute.
    DEMO_DEFAULTS = {"BROADFAST_ONLINE_PUBLISH_EVERY_S": "10", "BROADFAST_MONITOR_INTERVAL_S": "60"}

    def _env(self, stack_env: dict[str, str], **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROADFAST_")}
        env |= self.base.public_env() | stack_env
        env |= {k: v for k, v in self.DEMO_DEFAULTS.items() if k not in os.environ}
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

    # -- run -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from streams.stack import free_port

        self.logs.mkdir(parents=True, exist_ok=True)
        data = self._data()
        settings, stack_env = self._stack()
        try:
            first_version, first_quality = self._bootstrap_student(settings, data)
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            env = self._env(
                stack_env,
                BROADFAST_SCORING_URL=url, BROADFAST_SERVE_PORT=str(port), BROADFAST_TEACHER_BACKEND=self.config.teacher,
                BROADFAST_TEACHER_ORACLE_DATA=str(data), BROADFAST_DATA=str(data),
            )  # fmt: skip
            self._features(env)
            serve = Component("serve", ["serve", "--port", str(port)], env, self.logs)
            self.components = [
                serve,
                Component("stream", ["stream"], env | {"BROADFAST_STREAM_WEB_PORT": "0"}, self.logs),
                Component("label", ["label", "--teacher", self.config.teacher], env, self.logs),
                Component("train", ["train", "online"], env, self.logs),
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
            reports = self._drift_report(env)
            return self._summary(watcher.tally, reports)
        finally:
            self.shutdown()

    def _traffic(self, settings: Settings, data: Path, url: str, watcher: Watcher) -> None:
        from streams.bus import EventBus
        from streams.datasets import load_pairs
        from streams.replay import HttpScorer, Replayer, plan_requests

        df = load_pairs(data, require_grade=True)
        scorer = HttpScorer(url)
        bus = EventBus(settings)
        stop = threading.Event()
        result: dict[str, Any] = {}

        def replay() -> None:
            planned = plan_requests(df, limit=None, seed=self.config.seed)
            result["stats"] = Replayer(bus, scorer=scorer, seed=self.config.seed).run(planned, rate=self.config.rate, stop=stop, concurrency=2)

        thread = threading.Thread(target=replay, name="demo-replay", daemon=True)
        self.started = time.monotonic()
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
        table.add_row("pairs scored", f"{counts.get('scored', 0):,}  ({counts.get('scored', 0) / max(elapsed, 1e-9):,.1f}/s)")
        table.add_row("hard cases", f"{counts.get('hardcases', 0):,}")
        table.add_row("teacher labels", f"{counts.get('labels', 0):,}")
        table.add_row("models published", f"{models}")
        table.add_row("versions served", ", ".join(versions[-4:]) or "—")
        if lat:
            table.add_row("scoring latency (server)", f"p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms")
        table.add_row("teacher–student agreement", f"{np.mean(agree):.0%} of {len(agree)}" if agree else "—")
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
        fresh = freshness(tally)
        client_lat = list(stats.latencies_ms) if stats is not None else []
        summary = {
            "duration_s": self.config.duration_s,
            "teacher": self.config.teacher,
            "requests": stats.requests if stats else 0,
            "failed_requests": stats.scoring_failed if stats else 0,
            "pairs_scored": tally.counts.get("scored", 0),
            "hard_cases": tally.counts.get("hardcases", 0),
            "labels": tally.counts.get("labels", 0),
            "labels_by_perspectives": {str(k): v for k, v in sorted(tally.perspectives.items())},
            "models_published": len(tally.models),
            "versions_served": list(tally.version_first_ts),
            "swaps": max(0, len(tally.version_first_ts) - 1),
            "serving_p99_ms": percentile(tally.server_latency_ms, 99),
            "serving_p50_ms": percentile(tally.server_latency_ms, 50),
            "client_p99_ms": percentile(client_lat, 99),
            "teacher_student_agreement": float(np.mean(tally.agreement)) if tally.agreement else None,
            "freshness_s": {"p50": percentile(fresh, 50), "p90": percentile(fresh, 90), "n": len(fresh)},
            "dead_letters": tally.counts.get("deadletter", 0),
            "alerts": [a.kind for a in tally.alerts],
            "quality": quality_summary(tally, self.config.teacher),
            "drift_reports": reports,
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


def render_summary(summary: dict[str, Any]) -> str:
    fresh = summary["freshness_s"]

    def ms(v: float | None) -> str:
        return "—" if v is None else f"{v:.1f} ms"

    def sec(v: float | None) -> str:
        return "—" if v is None else f"{v:.1f} s"

    agreement = summary["teacher_student_agreement"]
    lines = [
        f"requests {summary['requests']:,} ({summary['failed_requests']} failed), pairs scored {summary['pairs_scored']:,}",
        f"hard cases {summary['hard_cases']:,}, labels {summary['labels']:,} (perspectives per label: {summary['labels_by_perspectives'] or '—'})",
        f"models published {summary['models_published']}, swaps {summary['swaps']} (versions served: {', '.join(summary['versions_served']) or '—'})",
        f"serving latency p50 {ms(summary['serving_p50_ms'])}, p99 {ms(summary['serving_p99_ms'])}; client p99 {ms(summary['client_p99_ms'])}",
        f"freshness p50 {sec(fresh['p50'])}, p90 {sec(fresh['p90'])} over {fresh['n']} labels",
        f"teacher–student agreement {'—' if agreement is None else f'{agreement:.0%}'}; dead letters {summary['dead_letters']}; alerts {summary['alerts'] or 'none'}",
        f"teacher {summary['quality']['teacher']} ({', '.join(f'{k}: {v}' for k, v in summary['quality']['teacher_ids'].items()) or 'no labels'}): {summary['quality']['meaning']}",
        f"student quality (validation Spearman / NDCG@10 on held-out queries): {quality_line(summary['quality'])}",
        f"drift reports: {', '.join(summary['drift_reports']) or 'none'}",
        f"components at the end: {summary['components']}; logs in {summary['logs']}",
        *([f"FAILED: {', '.join(summary['components_died'])} exited during the demo (see their logs)"] if summary["components_died"] else []),
    ]
    return "\n".join(lines)


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
