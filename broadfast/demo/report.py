"""What the demo shows: a tally of every topic, and the figures and lines made from it.

:class:`Watcher` reads every topic from the start (its own consumer, no group) into a
:class:`Tally`; the functions below turn it into the live view's lines and the summary:
each version's validation quality and the teachers behind it, freshness, the labelling budget.

Freshness: for each label, the time from its pair's first scoring to the first response
served by a model whose training included that label (a version whose
``trained_on.offsets`` lie past the label's offset).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from broadfast.core.settings import Settings

# -- what happened: a tally of the topics ---------------------------------------------------------
@dataclass
class Tally:
    counts: Counter = field(default_factory=Counter)
    version_first_ts: dict[str, float] = field(default_factory=dict)
    server_latency_ms: list[float] = field(default_factory=list)
    student_probs: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    agreement: list[bool] = field(default_factory=list)
    perspectives: Counter = field(default_factory=Counter)
    labels: list[tuple[int, int, float | None, float, str]] = field(default_factory=list)  # partition, offset, first_scored_ts, label ts, query
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
        from broadfast.core.errors import EventValidationError
        from broadfast.core.bus import make_consumer, short_name
        from broadfast.core.events import decode

        consumer = make_consumer(self.settings, self.TOPICS, None)
        try:
            while not self.stop_event.is_set():
                for tp, records in consumer.poll(timeout_ms=500, max_records=2000).items():
                    topic = short_name(self.settings, tp.topic)
                    for record in records:
                        try:
                            event = decode(topic, record.value, max_bytes=self.settings.kafka.max_event_bytes)
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
                t.labels.append((partition, offset, event.first_scored_ts, event.ts, event.query))
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
    """A version's validation figures (the online trainer's fixed slice; ``stream_*``: the newest
    held-out labels of the traffic, when it had enough) and the teachers of its labels."""
    return {
        "spearman": metrics.get("val_spearman"), "ndcg@10": metrics.get("val_ndcg@10"),
        "stream_spearman": metrics.get("stream_spearman"), "stream_labels": metrics.get("stream_labels"),
        "teachers": dict((trained_on or {}).get("teachers") or {}), "published_ts": ts,
    }  # fmt: skip


def quality_summary(tally: Tally, teacher: str) -> dict[str, Any]:
    """Each version's validation quality; the first, best and last *served* versions; the teachers."""
    with tally.lock:
        quality = {v: dict(q) for v, q in tally.quality.items()}
        served = sorted(tally.version_first_ts, key=tally.version_first_ts.__getitem__)  # by first response, not by arrival
        teacher_ids = dict(tally.teacher_ids)
    versions = [{"version": v, "served": v in served, **q} for v, q in sorted(quality.items(), key=lambda kv: kv[1]["published_ts"])]
    scored = [v for v in versions if v["served"] and v["spearman"] is not None]
    first = next((v for v in scored if v["version"] == served[0]), scored[0] if scored else None) if served else None
    last = next((v for v in reversed(scored) if v["version"] == served[-1]), scored[-1] if scored else None) if served else None
    best = max(scored, key=lambda v: v["spearman"]) if scored else None
    gain = last["spearman"] - first["spearman"] if first and last else None
    on_traffic = [v for v in versions if v["served"] and v.get("stream_spearman") is not None]  # measured at most once a minute
    return {
        "teacher": teacher, "teacher_ids": teacher_ids, "meaning": TEACHER_MEANING.get(teacher, ""),
        "versions": versions, "first": first, "best": best, "last": last, "spearman_gain": gain, "traffic": on_traffic[-1] if on_traffic else None,
    }  # fmt: skip


TEACHER_MEANING = {
    "oracle": "a simulated annotator answering with the human relevance judgements of the data set — labels with real signal, "
    "so the student should get better; it stands in for a strong LLM teacher on a GPU",
    "transformers": "a tiny local LLM (SmolLM2-135M-Instruct) reasoning from three perspectives — real LLM labels, but a model "
    "this small carries almost no relevance signal (Spearman ≈ 0 with human grades), so the student is not expected to improve",
    "vllm": "the LLM behind BROADFAST_TEACHER_URL (vLLM's OpenAI API), reasoning from three perspectives — the student improves "
    "as far as that model's labels carry signal",
}


def backend_line(backend: dict[str, Any] | None) -> str:
    """The serving backend as the summary prints it.

    >>> backend_line({"name": "onnx-int8", "threads": 2})
    'onnx-int8 (threads 2)'
    >>> backend_line(None)
    'unknown'
    """
    if not backend:
        return "unknown"
    rest = ", ".join(f"{k} {v}" for k, v in backend.items() if k != "name" and isinstance(v, (str, int, float)))
    return str(backend.get("name", "?")) + (f" ({rest})" if rest else "")


def budget_line(b: dict[str, Any] | None) -> str:
    """The labelling budget in one line: admission rate (measured from the teacher, or the starting rate), queue, stale drops."""
    if b is None:
        return "—"
    source = "the teacher's measured rate" if b["rate_source"] == "measured" else "starting rate, no labeler has reported yet"
    return f"{b['rate']:.2f} hard cases/s ({source}); queue {b['backlog']} of at most {b['backlog_limit']}; dropped as stale {b['dropped_stale']}"


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
    traffic = q.get("traffic")
    if traffic is not None:
        line += f" (on the newest {traffic['stream_labels']:.0f} held-out traffic labels: {traffic['version']} Spearman {traffic['stream_spearman']:.3f})"
    gain = q["spearman_gain"]
    if gain is not None and q["last"]["version"] != q["first"]["version"]:
        line += f" — {gain:+.3f} Spearman since the first: " + ("the student got better on queries it never trained on" if gain >= 0.05 else "no clear change yet (the slice's noise is a few hundredths)" if gain > -0.05 else "worse than the first")
    return line


def freshness(tally: Tally, held_out: Callable[[str], bool] = lambda q: False) -> list[tuple[float, float]]:
    """Per label: (seconds from its pair's first scoring to the first response of a model trained on
    its label, of which seconds until the label was written). Labels of ``held_out`` queries (the
    trainer's validation slice: never trained on) are left out."""
    served = []
    for model in sorted(tally.models, key=lambda m: m.ts):
        offsets = {int(p): int(o) for p, o in (model.trained_on.get("offsets") or {}).items()}
        first = tally.version_first_ts.get(model.version)
        if offsets and first is not None:
            served.append((offsets, first))
    out = []
    for partition, offset, first_scored, labelled, query in tally.labels:
        if first_scored is None or held_out(query):
            continue
        for offsets, first in served:
            if offsets.get(partition, 0) > offset:
                out.append((max(0.0, first - first_scored), max(0.0, labelled - first_scored)))
                break
    return out


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def render_summary(summary: dict[str, Any]) -> str:
    fresh = summary["freshness_s"]

    def ms(v: float | None) -> str:
        return "—" if v is None else f"{v:.1f} ms"

    def sec(v: float | None) -> str:
        return "—" if v is None else f"{v:.1f} s"

    agreement = summary["teacher_student_agreement"]
    lines = [
        f"requests {summary['requests']:,} ({summary['failed_requests']} failed, {summary.get('events_lost', 0)} events lost), pairs scored {summary['pairs_scored']:,}",
        f"hard cases {summary['hard_cases']:,}, labels {summary['labels']:,} (perspectives per label: {summary['labels_by_perspectives'] or '—'})",
        f"models published {summary['models_published']}, swaps {summary['swaps']} (versions served: {', '.join(summary['versions_served']) or '—'})",
        f"serving latency p50 {ms(summary['serving_p50_ms'])}, p99 {ms(summary['serving_p99_ms'])}; client p99 {ms(summary['client_p99_ms'])}; "
        f"backend {backend_line(summary.get('serving_backend'))}",
        f"freshness p50 {sec(fresh['p50'])}, p90 {sec(fresh['p90'])} over {fresh['n']} labels "
        f"(first scoring → label p50 {sec(fresh.get('to_label_p50'))}; label → served by a model trained on it p50 {sec(fresh.get('label_to_served_p50'))})",
        f"teacher–student agreement {'—' if agreement is None else f'{agreement:.0%}'}; dead letters {summary['dead_letters']}; alerts {summary['alerts'] or 'none'}",
        f"teacher {summary['quality']['teacher']} ({', '.join(f'{k}: {v}' for k, v in summary['quality']['teacher_ids'].items()) or 'no labels'}): {summary['quality']['meaning']}",
        f"student quality (validation Spearman / NDCG@10 on held-out queries): {quality_line(summary['quality'])}",
        f"labelling budget at the end: {budget_line(summary['labelling'])}",
        f"drift reports: {', '.join(summary['drift_reports']) or 'none'}",
        f"components at the end: {summary['components']}; logs in {summary['logs']}",
        *([f"FAILED: {', '.join(summary['components_died'])} exited during the demo (see their logs)"] if summary["components_died"] else []),
    ]
    return "\n".join(lines)
