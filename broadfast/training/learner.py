"""The online learner: a small contract — learn from label rows, predict — and nothing of the loop.

:class:`OnlineLearner` knows a student, an optimizer and a replay buffer. It does not know
Kafka, the registry, the gate or checkpoints (that is :mod:`broadfast.training.online`), so the
benchmark and the tests drive exactly the code the live trainer runs.

``learn_many(rows)`` trains on a batch of fresh labels:

* every fresh label is trained on ``passes`` times (each pass a new shuffle of the fresh
  rows), so the number of optimizer steps follows the number of labels —
  ``ceil(passes × fresh / fresh-per-step)`` — instead of a fixed count per round;
* each step's batch is ``batch_size`` rows: ``replay_fraction`` of them replayed from a
  uniform reservoir of older labels (rehearsal, so old knowledge is not forgotten), the rest
  fresh;
* the loss is the offline recipe's (:func:`broadfast.training.step.train_step`, shared with
  :mod:`broadfast.training.distill`): KD to the teacher's soft distribution, cross-entropy to the
  grade where the label carries one (the oracle's human grade), rationale alignment where it
  carries embeddings; rows weigh by the teacher's confidence (its grade-token mass) when
  ``confidence_weighting`` is on;
* the model it serves (``model``: what ``predict_proba`` uses and the loop measures and
  publishes) is an exponential moving average of the trained weights (``ema_decay`` per
  step): one round of a few small steps moves the raw weights a lot — candidates measured a
  round apart differed by ±0.1 Spearman on the demo's slice — while the average moves with the
  trend, not the noise of the last steps;
* the learning rate warms up over ``warmup_steps`` and then decays as 1/√step (or stays
  constant): a stream has no known end for the offline recipe's linear decay to aim at, and
  1/√step beat constant on ``benchmarks/online.py`` (seed 0: dev Spearman 0.346 vs 0.307
  after 3,000 labels).

>>> buf = ReplayBuffer(capacity=2, seed=0)
>>> for i in range(3):
...     buf.add(LabelRow(str(i), "q", "t", [0.1, 0.2, 0.7]))
>>> buf.retire_fresh(); len(buf.reservoir), buf.seen
(2, 3)
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from broadfast.core.settings import TrainingSettings
from broadfast.training.distill import TrainConfig, make_optimizer
from broadfast.training.losses import LossConfig, lrkd_loss
from broadfast.training.step import Schedule, lr_scale, set_lr, train_step
from broadfast.model.student import Student, pad_batch


# -- what a label is, to the learner -----------------------------------------------------------
@dataclass
class LabelRow:
    """One teacher label, as the learner trains on it (and where it came from, for the loop)."""

    pair_id: str
    query: str
    text: str
    probs: list[float]
    rationale: list[list[float]] | None = None
    partition: int = 0
    offset: int = 0
    first_scored_ts: float | None = None
    grade: int = -1  # a human grade where the teacher has one (the oracle), else -1
    weight: float = 1.0  # the teacher's confidence (grade-token mass), 1 when unknown
    teacher_id: str = ""


# -- the replay buffer ---------------------------------------------------------------------------
@dataclass
class ReplayBuffer:
    """Fresh labels not trained on yet, plus a uniform reservoir (Algorithm R) of older ones."""

    capacity: int
    seed: int = 0
    fresh: list[LabelRow] = field(default_factory=list)
    reservoir: list[LabelRow] = field(default_factory=list)
    seen: int = 0

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def add(self, row: LabelRow) -> None:
        self.fresh.append(row)

    def replay(self, n: int) -> list[LabelRow]:
        """``n`` reservoir rows drawn uniformly (fewer when the reservoir is smaller)."""
        n = min(n, len(self.reservoir))
        return [self.reservoir[i] for i in self.rng.choice(len(self.reservoir), n, replace=False)] if n else []

    def schedule(self, rows: list[LabelRow], passes: int) -> list[LabelRow]:
        """``rows`` repeated ``passes`` times, each pass in a new random order."""
        order: list[LabelRow] = []
        for _ in range(passes):
            order += [rows[i] for i in self.rng.permutation(len(rows))]
        return order

    def retire(self, rows: list[LabelRow]) -> None:
        """Trained rows join the reservoir (Algorithm R: every row ever retired is equally likely to be kept)."""
        for row in rows:
            self.seen += 1
            if len(self.reservoir) < self.capacity:
                self.reservoir.append(row)
            else:
                j = int(self.rng.integers(0, self.seen))
                if j < self.capacity:
                    self.reservoir[j] = row

    def drop(self, rows: list[LabelRow]) -> None:
        """Take ``rows`` out of the reservoir (labels found poisonous are never replayed)."""
        bad = {id(r) for r in rows}
        self.reservoir = [r for r in self.reservoir if id(r) not in bad]

    def retire_fresh(self) -> None:
        self.retire(self.fresh)
        self.fresh = []

    def to_frame(self) -> pd.DataFrame:
        rows = [asdict(r) | {"fresh": True} for r in self.fresh] + [asdict(r) | {"fresh": False} for r in self.reservoir]
        return pd.DataFrame(rows)

    def load_frame(self, df: pd.DataFrame) -> None:
        known = set(LabelRow.__dataclass_fields__)
        for rec in df.to_dict("records"):
            fresh = bool(rec.pop("fresh"))
            rec = {k: v for k, v in rec.items() if k in known}
            rat = rec.get("rationale")
            rec["rationale"] = [list(map(float, r)) for r in rat] if rat is not None and len(rat) else None
            rec["probs"] = [float(p) for p in rec["probs"]]
            first = rec.get("first_scored_ts")
            rec["first_scored_ts"] = None if first is None or pd.isna(first) else float(first)
            (self.fresh if fresh else self.reservoir).append(LabelRow(**rec))


# -- the learner ---------------------------------------------------------------------------------
@dataclass
class LearnerConfig:
    """How the online learner trains (defaults chosen by ``benchmarks/online.py``; see docs/online.md)."""

    passes: int = 2  # times each fresh label is trained on
    batch_size: int = 32
    replay_fraction: float = 0.25  # share of each batch replayed from the reservoir
    reservoir_size: int = 5000
    lr: float = 1e-4  # encoder; the offline recipe's
    head_lr: float = 2e-4  # extractor, head, alignment projection (2× the encoder's: at 5× a stream of small rounds dips hard once warm-up ends)
    adam_beta2: float = 0.98  # AdamW's second-moment decay: a fresh optimizer on a live student adapts its step sizes within tens of steps, not thousands
    warmup_steps: int = 20
    schedule: Schedule = "inverse_sqrt"
    lr_floor: float = 0.1  # the schedule never goes below this share of the learning rate
    ema_decay: float = 0.9  # the served model averages the trained weights, per step (0: serve the raw weights)
    confidence_weighting: bool = True
    grad_clip: float = 1.0
    seed: int = 0
    loss: LossConfig = field(default_factory=LossConfig)

    @classmethod
    def from_settings(cls, training: TrainingSettings) -> LearnerConfig:
        return cls(
            passes=training.online_passes, batch_size=training.online_batch_size, replay_fraction=training.online_replay_fraction,
            reservoir_size=training.online_reservoir_size, lr=training.online_lr, head_lr=training.online_lr * training.online_head_lr_ratio,
            warmup_steps=training.online_warmup_steps, schedule=training.online_lr_schedule, lr_floor=training.online_lr_floor, ema_decay=training.online_ema_decay, adam_beta2=training.online_adam_beta2,
            confidence_weighting=training.online_confidence_weighting,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LearnStats:
    """What one ``learn_many`` call did."""

    labels: int
    steps: int
    skipped: int
    loss: dict[str, float]
    teachers: dict[str, int]
    rejected: list[LabelRow] = field(default_factory=list)  # fresh rows whose own loss is not finite: never trained on, never replayed


class OnlineLearner:
    """``learn_many(rows)`` / ``predict_proba(queries, texts)`` over a student."""

    def __init__(self, student: Student, config: LearnerConfig | None = None) -> None:
        self.config = config or LearnerConfig()
        self.buffer = ReplayBuffer(self.config.reservoir_size, seed=self.config.seed)
        self.steps = 0  # optimizer steps taken (the schedule's clock)
        self.skipped = 0
        self.reset(student)

    def reset(self, student: Student, steps: int | None = None, model: Student | None = None) -> None:
        """Train ``student`` from now on, with a fresh optimizer.

        The served average starts from ``model`` (a checkpoint's) or from ``student``.
        """
        self.student = student
        cfg = self.config
        self.opt = make_optimizer(student, TrainConfig(lr=cfg.lr, head_lr=cfg.head_lr, adam_beta2=cfg.adam_beta2))
        self.ema = (model or copy.deepcopy(student)).eval() if cfg.ema_decay > 0 else None
        if self.ema is not None:
            self.ema.requires_grad_(False)
        if steps is not None:
            self.steps = steps

    @torch.no_grad()
    def load_weights(self, source: Student) -> None:
        """Take ``source``'s weights (the trained ones and the served average), keeping the optimizer's
        running moments: a fresh AdamW's first steps are full-size, and on a stream of small,
        correlated batches they undo in a few rounds what the weights had learned."""
        self.student.load_state_dict(source.state_dict())
        if self.ema is not None:
            self.ema.load_state_dict(source.state_dict())

    @property
    def model(self) -> Student:
        """The model to serve: the moving average of the trained weights (the raw weights with ``ema_decay`` 0)."""
        return self.ema if self.ema is not None else self.student

    @torch.no_grad()
    def _update_average(self) -> None:
        if self.ema is None:
            return
        w = 1.0 - self.config.ema_decay
        for avg, cur in zip(self.ema.parameters(), self.student.parameters()):
            avg.lerp_(cur.detach(), w)
        for avg, cur in zip(self.ema.buffers(), self.student.buffers()):
            avg.copy_(cur)

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    # -- the contract --------------------------------------------------------------------------
    def learn_one(self, row: LabelRow) -> LearnStats:
        return self.learn_many([row])

    def learn_many(self, rows: list[LabelRow]) -> LearnStats:
        """Train on fresh ``rows`` (each ``passes`` times, mixed with replayed ones); then they join the reservoir."""
        cfg = self.config
        n_replay = int(round(cfg.batch_size * cfg.replay_fraction)) if self.buffer.reservoir else 0
        n_fresh = max(1, cfg.batch_size - n_replay)
        order = self.buffer.schedule(rows, cfg.passes)
        steps = math.ceil(len(order) / n_fresh) if order else 0
        parts: dict[str, float] = {}
        skipped = 0
        rejected: list[LabelRow] = []
        for k in range(steps):
            batch_rows = order[k * n_fresh : (k + 1) * n_fresh] + self.buffer.replay(n_replay)
            set_lr(self.opt, lr_scale(self.steps, cfg.warmup_steps, cfg.schedule, cfg.lr_floor))
            out = train_step(self.student, self.opt, self.to_batch(batch_rows), cfg.loss, cfg.grad_clip)
            self.steps += 1
            if out is None:
                skipped += 1
                rejected += [r for r in self.culprits(batch_rows) if all(r is not x for x in rejected)]
            else:
                parts = out
                self._update_average()
        self.skipped += skipped
        if rejected:
            self.buffer.drop(rejected)
        bad = {id(r) for r in rejected}
        self.buffer.retire([r for r in rows if id(r) not in bad])
        return LearnStats(len(rows), steps, skipped, parts, dict(Counter(r.teacher_id for r in rows)), rejected)

    @torch.no_grad()
    def culprits(self, rows: list[LabelRow]) -> list[LabelRow]:
        """The rows of a skipped step whose own loss is not finite (each scored alone): the labels
        that poisoned it. A step skipped for a non-finite *gradient* with finite losses names none."""
        self.student.eval()
        out = []
        for row in rows:
            batch = self.to_batch([row])
            pred = self.student(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            total, _ = lrkd_loss(pred, batch["teacher_probs"], batch["grades"], batch.get("rationale"), batch.get("has_rationale"), self.config.loss, weights=batch.get("weights"))
            if not torch.isfinite(total):
                out.append(row)
        return out

    def predict_proba(self, queries: list[str], texts: list[str], batch_size: int = 64) -> np.ndarray:
        return self.model.predict_proba(queries, texts, batch_size=batch_size)

    # -- rows to tensors -----------------------------------------------------------------------
    def to_batch(self, rows: list[LabelRow]) -> dict[str, Any]:
        s, device = self.student, self.device
        k, dim = s.config.n_perspectives, s.config.rationale_dim
        enc = s.tokenize([r.query for r in rows], [r.text for r in rows])
        batch = pad_batch(enc["input_ids"], enc["token_type_ids"], s.tokenizer.pad_token_id or 0, device)
        rationale = np.zeros((len(rows), k, dim), dtype=np.float32)
        has = np.zeros(len(rows), dtype=bool)
        for i, r in enumerate(rows):
            if r.rationale is not None and len(r.rationale) == k and all(len(v) == dim for v in r.rationale):
                rationale[i], has[i] = r.rationale, True
        weights = [r.weight if self.config.confidence_weighting else 1.0 for r in rows]
        return batch | {
            "teacher_probs": torch.tensor([r.probs for r in rows], dtype=torch.float32, device=device),
            "grades": torch.tensor([r.grade for r in rows], dtype=torch.long, device=device),
            "rationale": torch.from_numpy(rationale).to(device),
            "has_rationale": torch.from_numpy(has).to(device),
            "weights": torch.tensor(weights, dtype=torch.float32, device=device),
        }
