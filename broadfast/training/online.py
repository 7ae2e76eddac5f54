"""Online distillation: the loop around the learner — labels in, gated versions out, checkpoints, commits.

The learner (:mod:`broadfast.training.learner`: learn from rows, predict) knows nothing of this loop.
The loop, one *round* at a time:

1. consume teacher labels (``relevance.labels``); labels of held-out queries are counted and
   never trained on; the rest wait as *fresh* rows;
2. once ``online_round_labels`` fresh labels arrived (or ``online_round_wait_s`` passed with
   at least one), the learner trains on at most ``online_round_max_labels`` of them — each
   ``online_passes`` times, mixed with replayed older labels — so the number of steps follows
   the number of labels;
3. at most every ``online_publish_every_s``, the candidate (the learner's moving average of
   its weights) is measured on the fixed validation
   slice and judged by the gate (:mod:`broadfast.training.gate`) against the champion measured the same
   way: it is published (→ ``ModelPublished``, hot swap) only when it is at least the best
   champion's score minus ``online_gate_tolerance`` — so publishes never slide; a published
   version also records its figures on the newest held-out labels of the stream
   (:mod:`broadfast.training.stream_slice`: quality on the traffic it serves, ``stream_*`` metrics);
4. a refused candidate is **not** the silent base of the next one: after
   ``online_revert_after_refusals`` refusals in a row the learner goes back to the champion's
   weights (the optimizer keeps its moments); the refused rounds' labels stay in the replay reservoir;
5. checkpoint (weights, optimizer, buffer, offsets, gate state) and only then commit the label
   offsets: a label's offset is committed once it is inside a published or checkpointed model.

Every published version records what its weights were trained on: label offsets per
partition, label and step counts, and ``teachers`` — labels per teacher id, over the whole
lineage (a revert restores the champion's counts).

Restart: the checkpoint is loaded and the consumer resumes at the committed offsets;
records at or below the checkpoint's offsets are skipped (a crash between checkpoint
and commit repeats nothing). What a crash loses is the round in progress.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from broadfast.core.settings import Settings
from broadfast.core.events import Alert, TeacherLabel, normalize_query
from broadfast.training.gate import Gate, GateConfig, Measured, Verdict, high_water
from broadfast.training.learner import LabelRow, LearnerConfig, OnlineLearner
from broadfast.training.stream_slice import StreamSlice
from broadfast.model.student import Student, student_text, load_student, save_student

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
STATE_FILE = "online.json"
OPTIMIZER_FILE = "optimizer.pt"
BUFFER_FILE = "buffer.parquet"
CHAMPION_PROBS_FILE = "champion_probs.npy"
STREAM_SLICE_FILE = "stream_val.parquet"
STREAM_MEASURE_EVERY_S = 60.0  # a published version is measured on the traffic slice at most this often (unless the gate judges there): ~2 s of a 2-core trainer per measurement
AVERAGE_DIR = "average"  # the moving average of the weights: the model the gate measures and publishes


# -- the validation slice ---------------------------------------------------------------
def is_held_out(query: str, share: float) -> bool:
    """Whether a query belongs to the validation slice (a stable hash of the normalised query)."""
    digest = hashlib.blake2b(normalize_query(query).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < share


def validation_slice(df: pd.DataFrame, share: float, max_pairs: int, seed: int = 0) -> pd.DataFrame:
    """Whole held-out queries (for NDCG) up to about ``max_pairs`` pairs, in a seeded order."""
    held = df[[is_held_out(q, share) for q in df["query"]]]
    queries = held["query"].unique()
    rng = np.random.default_rng(seed)
    picked, n = [], 0
    for q in rng.permutation(queries):
        size = int((held["query"] == q).sum())
        if n and n + size > max_pairs:
            break
        picked.append(q)
        n += size
    return held[held["query"].isin(picked)].reset_index(drop=True)


def validation_frame(paths: Sequence[Path], share: float, max_pairs: int) -> pd.DataFrame:
    """The fixed validation slice over one data set or several (a shift's old and new traffic): each file's
    held-out queries (:func:`validation_slice`), ``max_pairs`` shared equally. Pooled, each file's ``relevance``
    is rescaled linearly from its own range onto 1-3 (Home Depot's), so Spearman and NDCG compare like with like."""
    from broadfast.core.datasets import load_pairs

    if len(paths) == 1:
        return validation_slice(load_pairs(paths[0], require_grade=True), share, max_pairs)
    parts = []
    for path in paths:
        df = load_pairs(path, require_grade=True)
        if "relevance" not in df.columns or not np.isfinite(df["relevance"].to_numpy(dtype=float)).any():
            raise ValueError(f"{path} has no relevance judgements to pool with the other validation files")
        low, high = float(df["relevance"].min()), float(df["relevance"].max())  # the file's own scale, as the oracle reads it
        part = validation_slice(df, share, max(1, max_pairs // len(paths)))
        parts.append(part.assign(relevance=1.0 + 2.0 * (part["relevance"] - low) / (high - low) if high > low else 2.0))
    return pd.concat(parts, ignore_index=True)


def row_of(label: TeacherLabel, partition: int, offset: int) -> LabelRow:
    """A label as the learner trains on it: soft probs, the grade where there is one, confidence as weight."""
    emb = label.rationale_embeddings
    return LabelRow(
        pair_id=label.pair_id, query=label.query, text=student_text(label.title, label.text), probs=list(label.probs),
        rationale=[list(v) for v in emb] if emb is not None else None, partition=partition, offset=offset,
        first_scored_ts=label.first_scored_ts, grade=label.grade if label.grade is not None else -1,
        weight=label.confidence if label.confidence is not None else 1.0, teacher_id=label.teacher_id,
    )  # fmt: skip


# -- the trainer -------------------------------------------------------------------------
@dataclass
class RoundResult:
    round: int
    labels: int
    steps: int
    loss: dict[str, float]  # the round's last step
    skipped: int = 0
    published: str | None = None
    candidate: dict[str, float] | None = None
    verdict: str | None = None
    refused: str | None = None
    reverted_to: str | None = None
    teachers: dict[str, int] = field(default_factory=dict)
    rejected: list[LabelRow] = field(default_factory=list)  # labels whose own loss was not finite: dead-lettered, never trained on
    seconds: dict[str, float] = field(default_factory=dict)  # where the round's time went: train, gate (measure, judge, publish), checkpoint
    stream: dict[str, float] = field(default_factory=dict)  # the candidate's figures on the rolling slice of held-out traffic labels (when judged there or published)


@dataclass
class Lineage:
    """What a set of weights was trained on: labels per teacher and, per partition of the labels
    topic, the offset after the last label trained (a prefix: rounds take fresh labels in order)."""

    teachers: Counter = field(default_factory=Counter)
    offsets: dict[int, int] = field(default_factory=dict)

    @property
    def labels(self) -> int:
        return sum(self.teachers.values())

    def add(self, rows: list[LabelRow]) -> None:
        self.teachers.update(r.teacher_id for r in rows)
        for r in rows:
            self.offsets[r.partition] = max(self.offsets.get(r.partition, 0), r.offset + 1)

    def copy(self) -> Lineage:
        return Lineage(Counter(self.teachers), dict(self.offsets))

    def to_dict(self) -> dict[str, Any]:
        return {"teachers": dict(self.teachers), "offsets": {str(p): o for p, o in sorted(self.offsets.items())}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Lineage:
        return cls(Counter(d.get("teachers") or {}), {int(p): int(o) for p, o in (d.get("offsets") or {}).items()})


class OnlineTrainer:
    """The loop's state around an :class:`OnlineLearner`: gate, publish, revert, checkpoint.

    The Kafka side is :func:`run_online`; tests and benchmarks drive this class directly.
    """

    def __init__(self, settings: Settings, registry: Any, val: pd.DataFrame, *, device: str | None = None, learner_config: LearnerConfig | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.gate = Gate(val, GateConfig.from_settings(settings.training))
        self.device = torch.device(device or settings.training.train_device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.learner_config = learner_config or LearnerConfig.from_settings(settings.training)
        self.dir = settings.home / "trainer"
        self.offsets: dict[int, int] = {}  # next offset to read, per partition of the labels topic (consumed, not all trained)
        self.rounds = 0
        self.labels_trained = 0  # fresh labels trained on by this trainer (refused and reverted rounds included)
        self.held_out = 0
        self.stream_val = StreamSlice(settings.training.online_stream_val_labels)  # the newest held-out labels: validation that follows the traffic
        self._champion_model: Student | None = None  # the champion's weights, loaded when the traffic slice judges
        self.refused = 0  # candidates refused in a row since the last publish or revert
        self.last_gate = 0.0
        self.last_stream = 0.0  # when a published version was last measured on the traffic slice
        self.live_version: str | None = None
        self.champion: Measured | None = None
        self.best = float("-inf")  # high-water mark of the champions' gate metric on the slice
        self.lineage = Lineage()  # what the current weights were trained on
        self.champion_lineage = Lineage()
        self.learner: OnlineLearner
        self.problems: list[str] = []  # what went wrong at start (a checkpoint that could not be resumed): alerts to raise

    @property
    def student(self) -> Student:
        return self.learner.student

    @property
    def buffer(self) -> Any:
        return self.learner.buffer

    @property
    def steps(self) -> int:
        return self.learner.steps

    @property
    def live_metrics(self) -> dict[str, float]:
        return self.champion.metrics if self.champion is not None else {}

    # -- start ---------------------------------------------------------------------------
    def start(self) -> None:
        """Resume from the checkpoint (or the one being replaced when a swap was cut short), else start
        from the registry's champion. A checkpoint that cannot be resumed (corrupt, non-finite weights,
        a torn file) is skipped with its reason in :attr:`problems` — the trainer still starts."""
        for ckpt in (self.dir / CHECKPOINT, self.dir / (CHECKPOINT + ".old")):
            if (ckpt / STATE_FILE).exists():
                try:
                    self._resume(ckpt)
                    return
                except Exception as exc:  # noqa: BLE001 - CheckpointError, a torn JSON or parquet, a foreign optimizer state
                    self.problems.append(f"checkpoint {ckpt} cannot be resumed ({type(exc).__name__}: {exc})")
                    log.error("%s; trying the next", self.problems[-1])
                    self.offsets, self.rounds, self.labels_trained, self.held_out, self.refused = {}, 0, 0, 0, 0
        if self.problems:
            log.warning("starting from the registry's champion instead: the labels trained since it are read again from the committed offsets")
        student, manifest = self.registry.load(device=str(self.device))
        self.learner = OnlineLearner(student, self.learner_config)
        self._adopt_champion(manifest, student)

    def _adopt_champion(self, manifest: Any, student: Student) -> None:
        """Measure the registry's champion on the slice; keep the lineage's high-water mark when it was set on this slice."""
        self.live_version = manifest.version
        trained_on = manifest.trained_on or {}
        # teachers carry over from the lineage; offsets belong to the topic this trainer reads, so they start anew
        self.lineage = Lineage(Counter(trained_on.get("teachers") or {}), {})
        self.champion_lineage = self.lineage.copy()
        self.champion = self.gate.measure(student)
        same_slice = trained_on.get("gate_slice") == self.gate.fingerprint
        self.best = high_water(self.champion.value, float(manifest.metrics.get("gate_best", float("nan"))) if same_slice else float("nan"))
        log.info("starting from champion %s; validation %s; gate high-water mark %.4f", self.live_version, _fmt(self.champion.metrics), self.best)

    def _resume(self, ckpt: Path) -> None:
        state = json.loads((ckpt / STATE_FILE).read_text())
        average = load_student(ckpt / AVERAGE_DIR, self.device) if (ckpt / AVERAGE_DIR).exists() else None
        self.learner = OnlineLearner(load_student(ckpt, self.device), self.learner_config)
        if average is not None and self.learner.ema is not None:
            self.learner.reset(self.learner.student, model=average)
        self.learner.opt.load_state_dict(torch.load(ckpt / OPTIMIZER_FILE, weights_only=True, map_location=self.device))
        if (ckpt / BUFFER_FILE).exists():
            self.buffer.load_frame(pd.read_parquet(ckpt / BUFFER_FILE))
        if (ckpt / STREAM_SLICE_FILE).exists():
            self.stream_val.load_frame(pd.read_parquet(ckpt / STREAM_SLICE_FILE))
        self.buffer.seen = int(state["seen"])
        self.learner.steps = int(state["steps"])
        self.offsets = {int(p): int(o) for p, o in state["offsets"].items()}
        self.rounds = int(state["rounds"])
        self.labels_trained, self.held_out = int(state["labels_trained"]), int(state["held_out"])
        self.live_version, self.refused = state["live_version"], int(state["refused"])
        self.lineage, self.champion_lineage = Lineage.from_dict(state["lineage"]), Lineage.from_dict(state["champion_lineage"])
        champion = self.registry.champion() if self.registry is not None else self.live_version
        if state.get("gate_slice") == self.gate.fingerprint and champion == self.live_version:
            self.champion = self.gate.measure_probs(np.load(ckpt / CHAMPION_PROBS_FILE, allow_pickle=False))
            self.best = high_water(float(state["best"]))
        else:  # another slice or metric, or the champion changed behind the checkpoint (a publish not yet checkpointed, a rollback)
            log.warning("checkpoint %s: gate slice or champion changed (%s → %s): measuring the registry's champion again", ckpt, self.live_version, champion)
            student, manifest = self.registry.load(champion, device=str(self.device))
            lineage = self.lineage
            self._adopt_champion(manifest, student)
            self.lineage = lineage  # the weights being trained are the checkpoint's
        log.info("resumed from %s: round %d, step %d, %d labels trained, offsets %s", ckpt, self.rounds, self.steps, self.labels_trained, self.offsets)

    # -- one round -----------------------------------------------------------------------
    def add(self, row: LabelRow) -> bool:
        """Queue a label row for training; False when it is held out for validation or already trained on."""
        if row.offset < self.offsets.get(row.partition, 0):
            return False  # already inside the checkpoint
        self.offsets[row.partition] = row.offset + 1
        if is_held_out(row.query, self.settings.training.online_val_share):
            self.held_out += 1
            self.stream_val.add(row)
            return False
        self.buffer.add(row)
        return True

    def train_round(self) -> RoundResult:
        """Train on the waiting fresh labels (at most ``online_round_max_labels``), then gate, publish and checkpoint."""
        s = self.settings
        rows, self.buffer.fresh = self.buffer.fresh[: s.training.online_round_max_labels], self.buffer.fresh[s.training.online_round_max_labels :]
        t0 = time.perf_counter()
        stats = self.learner.learn_many(rows)
        t1 = time.perf_counter()
        self.labels_trained += stats.labels
        self.lineage.add(rows)
        self.rounds += 1
        result = RoundResult(self.rounds, stats.labels, stats.steps, stats.loss, stats.skipped, teachers=stats.teachers, rejected=stats.rejected)
        if stats.skipped:
            log.warning("round %d: %d of %d steps skipped (non-finite loss or gradient)", self.rounds, stats.skipped, stats.steps)
        if time.time() - self.last_gate >= s.training.online_publish_every_s:
            self._gate_and_publish(result)
        t2 = time.perf_counter()
        self.checkpoint()
        result.seconds = {"train": t1 - t0, "gate": t2 - t1, "checkpoint": time.perf_counter() - t2}
        return result

    def _gate_and_publish(self, result: RoundResult) -> None:
        assert self.champion is not None
        s = self.settings
        self.last_gate = time.time()
        candidate = self.gate.measure(self.learner.model)
        verdict = self.gate.judge(candidate, self.champion, self.best)
        if verdict.publish and s.training.online_gate_slice == "fixed+stream":
            verdict = self._judge_on_traffic(verdict, result)
        result.candidate, result.verdict = candidate.metrics, verdict.reason
        if not verdict.publish:
            self.refused += 1
            result.refused = verdict.reason
            log.info("round %d: candidate refused (%s)", self.rounds, verdict.reason)
            if self.refused >= s.training.online_revert_after_refusals:
                self._revert(result)
            return
        best = high_water(self.best, candidate.value)
        trained_on = {
            "topic": s.topic("labels"),
            **self.lineage.to_dict(),  # teachers over the whole lineage; offsets: the labels these weights were trained on
            "labels": self.lineage.labels,
            "held_out": self.held_out,
            "steps": self.steps,
            "gate": verdict.reason,
            "gate_slice": self.gate.fingerprint,
            "learner": {k: v for k, v in self.learner_config.to_dict().items() if k != "loss"},
        }
        if not result.stream and time.time() - self.last_stream >= STREAM_MEASURE_EVERY_S:
            result.stream = self.stream_val.measure(self.learner.model, self.gate.config.metric)  # what it will serve, on the newest held-out traffic
        self.last_stream = time.time() if result.stream else self.last_stream
        metrics = {f"val_{k}": v for k, v in candidate.metrics.items()}  # the registry keeps the finite ones (the contract's)
        metrics |= result.stream
        metrics |= {"gate_delta": verdict.delta, "gate_delta_lo": verdict.interval[0], "gate_delta_hi": verdict.interval[1], "gate_floor": verdict.floor, "gate_best": best}
        with tempfile.TemporaryDirectory(prefix="broadfast-online-") as tmp:
            folder = save_student(self.learner.model, Path(tmp) / "model")
            manifest = self.registry.publish(folder, parent=self.live_version, metrics=metrics, trained_on=trained_on, champion=True)
        on_traffic = f"; on the newest {len(self.stream_val)} held-out traffic labels: {_fmt(result.stream)}" if result.stream else ""
        log.info("round %d: published %s (parent %s): %s%s", self.rounds, manifest.version, self.live_version, verdict.reason, on_traffic)
        self.live_version, self.champion, self.best = manifest.version, candidate, best
        self._champion_model = None  # loaded again when the traffic slice needs it
        self.champion_lineage = self.lineage.copy()
        self.refused = 0
        result.published = manifest.version

    def _judge_on_traffic(self, verdict: Verdict, result: RoundResult) -> Verdict:
        """``online_gate_slice=fixed+stream``: a candidate that holds the fixed slice's floor must also be
        at least the champion minus the tolerance on the newest held-out traffic labels, both measured
        now on the same labels (the slice moves, so there is no high-water mark on it: the fixed slice's
        floor keeps publishes from sliding)."""
        metric, tol = self.gate.config.metric, self.gate.config.tolerance
        result.stream = self.stream_val.measure(self.learner.model, metric)
        if not result.stream:
            return replace(verdict, reason=verdict.reason + f"; traffic slice not judged yet ({len(self.stream_val)} held-out labels)")
        if self._champion_model is None:
            self._champion_model, _ = self.registry.load(self.live_version, device=str(self.device))
        champion = self.stream_val.measure(self._champion_model, metric)
        cand, champ = result.stream[f"stream_{metric}"], champion[f"stream_{metric}"]
        on = f"on the newest {len(self.stream_val)} held-out traffic labels {metric} {cand:.4f} vs champion {champ:.4f}"
        if not np.isfinite(cand) or cand < champ - tol:
            return replace(verdict, publish=False, reason=f"{on} (below it by more than the tolerance {tol}); fixed slice: {verdict.reason}")
        return replace(verdict, reason=f"{verdict.reason}; {on}")

    def _revert(self, result: RoundResult) -> None:
        """Back to the champion's weights and lineage; the optimizer's moments and the schedule's clock go on."""
        student, _ = self.registry.load(self.live_version, device=str(self.device))
        self.learner.load_weights(student)
        self.lineage = self.champion_lineage.copy()
        log.info("round %d: reverted to champion %s after %d refused candidate(s); their labels stay in the replay reservoir", self.rounds, self.live_version, self.refused)
        self.refused = 0
        result.reverted_to = self.live_version

    def checkpoint(self) -> Path:
        """Weights, optimizer, buffer, offsets and gate state, written aside then swapped in."""
        ckpt = self.dir / CHECKPOINT
        tmp = self.dir / (CHECKPOINT + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        save_student(self.student, tmp)
        if self.learner.ema is not None:
            save_student(self.learner.ema, tmp / AVERAGE_DIR)
        torch.save(self.learner.opt.state_dict(), tmp / OPTIMIZER_FILE)
        self.buffer.to_frame().to_parquet(tmp / BUFFER_FILE)
        if len(self.stream_val):
            self.stream_val.to_frame().to_parquet(tmp / STREAM_SLICE_FILE)
        assert self.champion is not None
        np.save(tmp / CHAMPION_PROBS_FILE, self.champion.probs, allow_pickle=False)
        state = {
            "offsets": self.offsets, "seen": self.buffer.seen, "rounds": self.rounds, "steps": self.steps,
            "labels_trained": self.labels_trained, "held_out": self.held_out, "live_version": self.live_version,
            "live_metrics": self.live_metrics, "best": self.best, "refused": self.refused, "gate_slice": self.gate.fingerprint,
            "lineage": self.lineage.to_dict(), "champion_lineage": self.champion_lineage.to_dict(), "ts": time.time(),
        }  # fmt: skip
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        old = self.dir / (CHECKPOINT + ".old")
        if ckpt.exists():
            if old.exists():
                shutil.rmtree(old)
            ckpt.rename(old)
        tmp.rename(ckpt)
        if old.exists():
            shutil.rmtree(old)
        return ckpt


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k not in ("pairs", "queries"))


def reread_if_log_lost(consumer: Any, trainer: OnlineTrainer, tp: Any) -> None:
    """A record below the offsets this trainer has read is normally one it already trained on (a
    crash between checkpoint and commit). But when the partition now ends below them, its log was
    lost (a broker that kept it in memory restarted, the topic was recreated): read it from the start
    instead of skipping every new label until the old offsets come round again."""
    end = consumer.end_offsets([tp]).get(tp)
    seen = trainer.offsets.get(tp.partition, 0)
    if end is not None and end < seen:
        log.warning("labels partition %d ends at offset %d, below the %d this trainer had read: its log was lost (broker restarted or topic recreated); reading it from the start", tp.partition, end, seen)
        trainer.offsets[tp.partition] = 0


def run_online(settings: Settings, *, stop: threading.Event | None = None, max_rounds: int | None = None, val_data: Path | Sequence[Path] | None = None) -> OnlineTrainer:
    """The ``broadfast train online`` loop: consume labels, train rounds, publish, commit."""
    from kafka.structs import OffsetAndMetadata, TopicPartition

    from broadfast.core.bus import EventBus, commit, consume, make_consumer
    from broadfast.core.deadletter import DeadLetters
    from broadfast.model.registry import Registry

    stop = stop or threading.Event()
    paths = [Path(val_data)] if isinstance(val_data, (str, Path)) else list(val_data or [settings.data])
    val = validation_frame(paths, settings.training.online_val_share, settings.training.online_val_pairs)
    log.info("validation slice: %d pairs of %d held-out queries", len(val), val["query"].nunique())
    trainer = OnlineTrainer(settings, Registry(settings), val)
    trainer.start()
    topic = settings.topic("labels")
    consumer = make_consumer(settings, ["labels"], group_id="broadfast-trainer", max_poll_records=256)
    with EventBus(settings) as bus:
        for problem in trainer.problems:
            bus.publish(Alert(kind="trainer_checkpoint_refused", severity="critical", ts=time.time(), details={"reason": problem[:4000], "started_from": trainer.live_version}))
        letters = DeadLetters(settings, bus, "trainer")
        waiting_since: float | None = time.monotonic() if trainer.buffer.fresh else None  # fresh rows restored from the checkpoint
        committed = dict(trainer.offsets)  # what the group has committed (as far as this trainer knows)

        def passed_over(partition: int, offset: int) -> None:  # dead-lettered: the next commit covers it
            trainer.offsets[partition] = max(trainer.offsets.get(partition, 0), offset + 1)

        def commit_offsets() -> dict[int, int]:  # refused: re-read, skipped by the checkpoint's offsets
            offsets = dict(trainer.offsets)
            commit(consumer, {TopicPartition(topic, p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items()})
            return offsets

        try:
            for delivery in consume(settings, consumer, letters, poll_timeout_ms=500, on_deadletter=passed_over):
                if stop.is_set():
                    break
                if delivery is not None:
                    label = delivery.event
                    assert isinstance(label, TeacherLabel)
                    if not label.title and not label.text:
                        letters.send(delivery.topic, delivery.partition, delivery.offset, "label carries no ad text: nothing to train on", label.model_dump_json())
                        passed_over(delivery.partition, delivery.offset)
                        continue
                    if delivery.offset < trainer.offsets.get(delivery.partition, 0):
                        reread_if_log_lost(consumer, trainer, TopicPartition(delivery.topic, delivery.partition))
                    if trainer.add(row_of(label, delivery.partition, delivery.offset)):
                        waiting_since = waiting_since or time.monotonic()
                fresh = len(trainer.buffer.fresh)
                if delivery is None and not fresh and trainer.offsets != committed:
                    # idle with nothing waiting: what was read since the last round is held out or
                    # dead-lettered, so its offsets can move on (a restart would dead-letter it again)
                    committed = commit_offsets()
                due = fresh >= settings.training.online_round_labels or (fresh and waiting_since and time.monotonic() - waiting_since >= settings.training.online_round_wait_s)
                if due:
                    result = trainer.train_round()
                    waiting_since = time.monotonic() if trainer.buffer.fresh else None
                    for row in result.rejected:  # before the commit: a crash re-reads them rather than losing them
                        letters.send(topic, row.partition, row.offset, "its training loss is not finite: the step that held it was skipped and the label is never trained on or replayed", json.dumps(asdict(row), default=str))
                    if result.rejected:
                        bus.flush()
                    committed = commit_offsets()
                    took = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items() if v >= 0.05)
                    log.info("round %d: %d labels, %d steps, loss %s%s (%s)", result.round, result.labels, result.steps, _fmt(result.loss), f", published {result.published}" if result.published else "", took)
                    if max_rounds is not None and trainer.rounds >= max_rounds:
                        break
        finally:
            consumer.close()
    return trainer
