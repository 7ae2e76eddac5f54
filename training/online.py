"""Online distillation: learn continuously from ``relevance.labels`` and publish gated versions.

The loop, one *round* at a time:

1. consume teacher labels into a replay buffer — the *fresh* labels not trained on yet,
   and a reservoir (uniform reservoir sampling) of older ones, so old knowledge is
   rehearsed and not forgotten;
2. once ``online_round_labels`` fresh labels arrived (or ``online_round_wait_s`` passed
   with at least one), take ``online_steps_per_round`` optimizer steps with the LRKD
   losses; each batch mixes fresh labels with ``online_replay_fraction`` of reservoir ones;
3. at most every ``online_publish_every_s``, evaluate the candidate on a fixed validation
   slice and publish it to the registry (→ ``ModelPublished``, hot swap) only when it is
   not worse than the live version by more than ``online_gate_tolerance``;
4. checkpoint (weights, optimizer, buffer, consumed offsets) and only then commit the
   label offsets: a label's offset is committed once it is inside a published or
   checkpointed model.

Restart: the checkpoint is loaded and the consumer resumes at the committed offsets;
records at or below the checkpoint's offsets are skipped (a crash between checkpoint
and commit repeats nothing). What a crash loses is the round in progress: its labels
are consumed again and at most one round (``online_steps_per_round`` steps) is redone.

The validation slice is query-disjoint from training: queries of the data set whose
hash falls in the first ``online_val_share`` are held out, and labels of those queries
are never trained on (they are counted as ``held_out``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from broadfast.settings import Settings
from streams.events import TeacherLabel, normalize_query
from training.distill import make_optimizer, TrainConfig
from training.losses import LossConfig, lrkd_loss
from training.metrics import evaluate
from training.student import Student, ad_text, autocast, load_student, pad_batch, save_student

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
STATE_FILE = "online.json"
OPTIMIZER_FILE = "optimizer.pt"
BUFFER_FILE = "buffer.parquet"


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


def validate(student: Student, val: pd.DataFrame) -> dict[str, float]:
    texts = [ad_text(t, d) for t, d in zip(val["title"], val["description"])]
    return evaluate(val, student.predict_proba(val["query"].tolist(), texts, batch_size=64))


# -- the replay buffer -------------------------------------------------------------------
@dataclass
class LabelRow:
    pair_id: str
    query: str
    text: str
    probs: list[float]
    rationale: list[list[float]] | None
    partition: int
    offset: int
    first_scored_ts: float | None = None


@dataclass
class ReplayBuffer:
    """Fresh labels plus a uniform reservoir of older ones."""

    capacity: int
    seed: int = 0
    fresh: list[LabelRow] = field(default_factory=list)
    reservoir: list[LabelRow] = field(default_factory=list)
    seen: int = 0

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def add(self, row: LabelRow) -> None:
        self.fresh.append(row)

    def batch(self, size: int, replay_fraction: float) -> list[LabelRow]:
        """Fresh labels first (all of them over a round), topped up with reservoir ones."""
        n_old = min(len(self.reservoir), int(round(size * replay_fraction))) if self.reservoir else 0
        n_new = min(len(self.fresh), size - n_old)
        rows = [self.fresh[i] for i in self.rng.choice(len(self.fresh), n_new, replace=False)] if n_new else []
        if n_old:
            rows += [self.reservoir[i] for i in self.rng.choice(len(self.reservoir), n_old, replace=False)]
        return rows

    def retire_fresh(self) -> None:
        """After a round: fresh labels join the reservoir (Algorithm R)."""
        for row in self.fresh:
            self.seen += 1
            if len(self.reservoir) < self.capacity:
                self.reservoir.append(row)
            else:
                j = int(self.rng.integers(0, self.seen))
                if j < self.capacity:
                    self.reservoir[j] = row
        self.fresh = []

    def to_frame(self) -> pd.DataFrame:
        rows = [asdict(r) | {"fresh": True} for r in self.fresh] + [asdict(r) | {"fresh": False} for r in self.reservoir]
        return pd.DataFrame(rows)

    def load_frame(self, df: pd.DataFrame) -> None:
        for rec in df.to_dict("records"):
            fresh = bool(rec.pop("fresh"))
            rat = rec.get("rationale")
            rec["rationale"] = [list(map(float, r)) for r in rat] if rat is not None and len(rat) else None
            rec["probs"] = [float(p) for p in rec["probs"]]
            rec["first_scored_ts"] = None if pd.isna(rec.get("first_scored_ts")) else float(rec["first_scored_ts"])
            (self.fresh if fresh else self.reservoir).append(LabelRow(**rec))


def row_of(label: TeacherLabel, partition: int, offset: int, k: int, dim: int) -> LabelRow:
    emb = label.rationale_embeddings
    ok = emb is not None and len(emb) == k and all(len(v) == dim for v in emb)
    return LabelRow(
        pair_id=label.pair_id, query=label.query, text=ad_text(label.ad_title, label.ad_text), probs=list(label.probs),
        rationale=[list(v) for v in emb] if ok else None, partition=partition, offset=offset, first_scored_ts=label.first_scored_ts,
    )  # fmt: skip


# -- the trainer -------------------------------------------------------------------------
@dataclass
class RoundResult:
    round: int
    labels: int
    steps: int
    loss: dict[str, float]
    published: str | None = None
    candidate: dict[str, float] | None = None
    refused: str | None = None


class OnlineTrainer:
    """Trains a student from label rows; the Kafka loop around it is :func:`run_online`."""

    def __init__(self, settings: Settings, registry: Any, val: pd.DataFrame, *, device: str | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.val = val
        self.device = torch.device(device or getattr(settings, "train_device", None) or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dir = settings.home / "trainer"
        self.buffer = ReplayBuffer(settings.online_reservoir_size)
        self.offsets: dict[int, int] = {}  # next offset to read, per partition of the labels topic
        self.rounds = 0
        self.steps = 0
        self.labels_trained = 0
        self.held_out = 0
        self.last_publish = 0.0
        self.live_version: str | None = None
        self.live_metrics: dict[str, float] = {}
        self.student: Student
        self.opt: torch.optim.Optimizer

    # -- start ---------------------------------------------------------------------------
    def start(self) -> None:
        """Resume from the checkpoint, else start from the registry's champion."""
        ckpt = self.dir / CHECKPOINT
        if (ckpt / STATE_FILE).exists():
            state = json.loads((ckpt / STATE_FILE).read_text())
            self.student = load_student(ckpt, self.device)
            self._make_optimizer()
            self.opt.load_state_dict(torch.load(ckpt / OPTIMIZER_FILE, weights_only=True, map_location=self.device))
            if (ckpt / BUFFER_FILE).exists():
                self.buffer.load_frame(pd.read_parquet(ckpt / BUFFER_FILE))
            self.buffer.seen = int(state["seen"])
            self.offsets = {int(p): int(o) for p, o in state["offsets"].items()}
            self.rounds, self.steps = int(state["rounds"]), int(state["steps"])
            self.labels_trained, self.held_out = int(state["labels_trained"]), int(state["held_out"])
            self.live_version, self.live_metrics = state["live_version"], state["live_metrics"]
            log.info("resumed from %s: round %d, step %d, %d labels trained, offsets %s", ckpt, self.rounds, self.steps, self.labels_trained, self.offsets)
            return
        self.student, manifest = self.registry.load(device=str(self.device))
        self.live_version = manifest.version
        self._make_optimizer()
        self.live_metrics = validate(self.student, self.val)
        log.info("starting from champion %s; validation %s", self.live_version, _fmt(self.live_metrics))

    def _make_optimizer(self) -> None:
        # small steps on few labels: the new parts learn 3x faster than the encoder, not the offline 10x
        cfg = TrainConfig(lr=self.settings.online_lr, head_lr=self.settings.online_lr * 3, loss=LossConfig())
        self.opt = make_optimizer(self.student, cfg)
        for group in self.opt.param_groups:
            group["lr"] = group.get("base_lr", group["lr"])

    # -- one round -----------------------------------------------------------------------
    def add(self, row: LabelRow) -> bool:
        """Queue a label row for training; False when it is held out for validation or already trained on."""
        if row.offset < self.offsets.get(row.partition, 0):
            return False  # already inside the checkpoint
        self.offsets[row.partition] = row.offset + 1
        if is_held_out(row.query, self.settings.online_val_share):
            self.held_out += 1
            return False
        self.buffer.add(row)
        return True

    def step(self, rows: list[LabelRow]) -> dict[str, float]:
        cfg = self.student.config
        enc = self.student.tokenize([r.query for r in rows], [r.text for r in rows])
        batch = pad_batch(enc["input_ids"], enc["token_type_ids"], self.student.tokenizer.pad_token_id or 0, self.device)
        probs = torch.tensor([r.probs for r in rows], dtype=torch.float32, device=self.device)
        grades = torch.full((len(rows),), -1, dtype=torch.long, device=self.device)
        has = torch.tensor([r.rationale is not None for r in rows], device=self.device)
        rationale = torch.zeros((len(rows), cfg.n_perspectives, cfg.rationale_dim), device=self.device)
        for i, r in enumerate(rows):
            if r.rationale is not None:
                rationale[i] = torch.tensor(r.rationale, dtype=torch.float32)
        self.student.train()
        with autocast(self.device):
            out = self.student(**batch)
        loss, parts = lrkd_loss(out, probs, grades, rationale, has, LossConfig())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.opt.step()
        self.steps += 1
        return parts

    def train_round(self) -> RoundResult:
        s = self.settings
        n_fresh = len(self.buffer.fresh)
        parts: dict[str, float] = {}
        for _ in range(s.online_steps_per_round):
            rows = self.buffer.batch(s.online_batch_size, s.online_replay_fraction)
            if rows:
                parts = self.step(rows)
        self.buffer.retire_fresh()
        self.labels_trained += n_fresh
        self.rounds += 1
        result = RoundResult(self.rounds, n_fresh, s.online_steps_per_round, parts)
        if time.time() - self.last_publish >= s.online_publish_every_s:
            self._gate_and_publish(result)
        self.checkpoint()
        return result

    def _gate_and_publish(self, result: RoundResult) -> None:
        s = self.settings
        metric = s.online_gate_metric
        candidate = validate(self.student, self.val)
        result.candidate = candidate
        live = self.live_metrics.get(metric, float("-inf"))
        cand = candidate.get(metric, float("nan"))
        if not np.isfinite(cand) or cand < live - s.online_gate_tolerance:
            result.refused = f"{metric} {cand:.4f} < live {live:.4f} - {s.online_gate_tolerance}"
            log.info("round %d: candidate not published (%s)", self.rounds, result.refused)
            return
        trained_on = {
            "topic": s.topic("labels"),
            "offsets": {str(p): o for p, o in sorted(self.offsets.items())},
            "labels": self.labels_trained,
            "held_out": self.held_out,
            "steps": self.steps,
        }
        metrics = {f"val_{k}": v for k, v in candidate.items() if np.isfinite(v)}
        with tempfile.TemporaryDirectory(prefix="broadfast-online-") as tmp:
            folder = save_student(self.student, Path(tmp) / "model")
            manifest = self.registry.publish(folder, parent=self.live_version, metrics=metrics, trained_on=trained_on, champion=True)
        log.info("round %d: published %s (parent %s): %s %.4f vs live %.4f", self.rounds, manifest.version, self.live_version, metric, cand, live)
        self.live_version, self.live_metrics = manifest.version, candidate
        self.last_publish = time.time()
        result.published = manifest.version

    def checkpoint(self) -> Path:
        """Weights, optimizer, buffer and offsets, written aside then swapped in."""
        ckpt = self.dir / CHECKPOINT
        tmp = self.dir / (CHECKPOINT + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        save_student(self.student, tmp)
        torch.save(self.opt.state_dict(), tmp / OPTIMIZER_FILE)
        self.buffer.to_frame().to_parquet(tmp / BUFFER_FILE)
        state = {
            "offsets": self.offsets, "seen": self.buffer.seen, "rounds": self.rounds, "steps": self.steps,
            "labels_trained": self.labels_trained, "held_out": self.held_out,
            "live_version": self.live_version, "live_metrics": self.live_metrics, "ts": time.time(),
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


def run_online(settings: Settings, *, stop: threading.Event | None = None, max_rounds: int | None = None, val_data: Path | None = None) -> OnlineTrainer:
    """The ``broadfast train online`` loop: consume labels, train rounds, publish, commit."""
    from kafka.structs import OffsetAndMetadata, TopicPartition

    from streams.bus import EventBus, consume, make_consumer
    from streams.datasets import load_pairs
    from streams.deadletter import DeadLetters
    from training.registry import Registry

    stop = stop or threading.Event()
    df = load_pairs(val_data or settings.data, require_grade=True)
    val = validation_slice(df, settings.online_val_share, settings.online_val_pairs)
    log.info("validation slice: %d pairs of %d held-out queries", len(val), val["query"].nunique())
    trainer = OnlineTrainer(settings, Registry(settings), val)
    trainer.start()
    cfg = trainer.student.config
    topic = settings.topic("labels")
    consumer = make_consumer(settings, ["labels"], group_id="broadfast-trainer", max_poll_records=256)
    with EventBus(settings) as bus:
        letters = DeadLetters(settings, bus, "trainer")
        waiting_since: float | None = None
        try:
            for delivery in consume(settings, consumer, letters, poll_timeout_ms=500):
                if stop.is_set():
                    break
                if delivery is not None:
                    label = delivery.event
                    assert isinstance(label, TeacherLabel)
                    if not label.ad_title and not label.ad_text:
                        letters.send(delivery.topic, delivery.partition, delivery.offset, "label carries no ad text: nothing to train on", label.model_dump_json())
                        trainer.offsets[delivery.partition] = delivery.offset + 1
                        continue
                    if trainer.add(row_of(label, delivery.partition, delivery.offset, cfg.n_perspectives, cfg.rationale_dim)):
                        waiting_since = waiting_since or time.monotonic()
                fresh = len(trainer.buffer.fresh)
                due = fresh >= settings.online_round_labels or (fresh and waiting_since and time.monotonic() - waiting_since >= settings.online_round_wait_s)
                if due:
                    result = trainer.train_round()
                    waiting_since = None
                    consumer.commit({TopicPartition(topic, p): OffsetAndMetadata(o, "", -1) for p, o in trainer.offsets.items()})
                    log.info("round %d: %d labels, loss %s%s", result.round, result.labels, _fmt(result.loss), f", published {result.published}" if result.published else "")
                    if max_rounds is not None and trainer.rounds >= max_rounds:
                        break
        finally:
            consumer.close()
    return trainer
