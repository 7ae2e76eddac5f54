"""Offline distillation: pre-tokenised, length-bucketed batches, checkpoints, resume.

The pairs are tokenised once into a padded int32 array; each epoch shuffles them,
sorts chunks of ``batch_size × bucket_factor`` by length and cuts batches from the
chunks (then shuffles the batches), so a batch pads to its own longest pair only.
On a GPU the forward pass runs under bf16 autocast. Every ``checkpoint_every`` steps
the model, optimizer and RNG states go to ``<out>/checkpoint``; a rerun with the same
data resumes from there at the exact batch it stopped after.

>>> import tempfile
>>> from broadfast.model.student import StudentConfig
>>> from broadfast.training.targets import human_targets
>>> df = pd.DataFrame({"query": ["drill", "hose"] * 4, "title": ["cordless drill", "garden hose"] * 4, "grade": [2, 0] * 4})
>>> cfg = TrainConfig(epochs=1, batch_size=8)
>>> with tempfile.TemporaryDirectory() as out:
...     student, report = train_offline_frame(df, human_targets(df, "grade"), cfg, StudentConfig.tiny(), out)
>>> report["steps"], report["targets"]
(1, 'grade')
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch

from broadfast.model.errors import CheckpointError
from broadfast.training.losses import LossConfig
from broadfast.training.step import set_lr, train_step
from broadfast.model.student import Student, StudentConfig, build_student, load_student, pair_texts, save_student
from broadfast.training.targets import Targets

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE = "trainer.pt"
TRAINER_JSON = "trainer.json"
REPORT_FILE = "training.json"


@dataclass
class TrainConfig:
    """Optimisation settings of one run (saved in ``training.json`` and the checkpoint)."""

    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-4  # encoder (beat 2e-4 on a 10k-pair Home Depot pilot; the recipe of benchmarks/quality.py)
    head_lr: float = 5e-4  # extractor, head, alignment projection
    weight_decay: float = 0.01
    adam_beta2: float = 0.999  # AdamW's second-moment decay
    warmup: float = 0.06  # fraction of the steps
    grad_clip: float = 1.0
    seed: int = 0
    bucket_factor: int = 50
    checkpoint_every: int = 500  # steps; 0 = only at the end of each epoch
    checkpoint: bool = True  # False: no checkpoints at all (benchmarks)
    max_steps: int | None = None  # stop after this global step (the schedule still spans all epochs)
    device: str | None = None  # None: cuda when available
    progress: bool = True
    loss: LossConfig = field(default_factory=LossConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainingSet:
    """Pre-tokenised pairs and their targets, as arrays."""

    input_ids: np.ndarray  # (n, L) int32, right-padded
    token_type_ids: np.ndarray  # (n, L) int8
    lengths: np.ndarray  # (n,) int32
    targets: Targets

    def __len__(self) -> int:
        return len(self.lengths)

    def fingerprint(self) -> str:
        """A hash of the token ids and targets: resuming on other data is refused."""
        h = hashlib.blake2b(digest_size=12)
        h.update(self.input_ids.tobytes())
        h.update(self.targets.teacher_probs.tobytes())
        return h.hexdigest()


def tokenize_frame(student: Student, df: pd.DataFrame, max_length: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenise every pair once into padded arrays (ids, token types, lengths)."""
    queries, texts = pair_texts(df)
    max_length = max_length or student.config.max_length
    enc = student.tokenize(queries, texts, max_length)
    lengths = np.array([len(x) for x in enc["input_ids"]], dtype=np.int32)
    width = int(lengths.max()) if len(lengths) else 1
    pad = student.tokenizer.pad_token_id or 0
    ids = np.full((len(lengths), width), pad, dtype=np.int32)
    types = np.zeros((len(lengths), width), dtype=np.int8)
    for i, (x, t) in enumerate(zip(enc["input_ids"], enc["token_type_ids"])):
        ids[i, : len(x)] = x
        types[i, : len(t)] = t
    return ids, types, lengths


def prepare(student: Student, df: pd.DataFrame, targets: Targets) -> TrainingSet:
    if len(df) != len(targets.teacher_probs):
        raise ValueError(f"{len(df)} rows but {len(targets.teacher_probs)} targets")
    ids, types, lengths = tokenize_frame(student, df)
    return TrainingSet(ids, types, lengths, targets)


def bucketed_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, bucket_factor: int = 50) -> list[np.ndarray]:
    """Index batches of one epoch: shuffled, then length-sorted within chunks, batches shuffled.

    Deterministic given (seed, epoch), so a resumed run sees the same order.
    """
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    chunk = batch_size * max(1, bucket_factor)
    batches: list[np.ndarray] = []
    for start in range(0, len(perm), chunk):
        part = perm[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def to_device(ts: TrainingSet, idx: np.ndarray, device: torch.device) -> dict[str, Any]:
    """One batch as tensors, cut to the batch's longest pair."""
    width = int(ts.lengths[idx].max())
    ids = torch.from_numpy(ts.input_ids[idx, :width].astype(np.int64))
    types = torch.from_numpy(ts.token_type_ids[idx, :width].astype(np.int64))
    mask = (torch.arange(width).unsqueeze(0) < torch.from_numpy(ts.lengths[idx]).unsqueeze(1)).long()
    t = ts.targets
    batch = {
        "input_ids": ids.to(device, non_blocking=True),
        "attention_mask": mask.to(device, non_blocking=True),
        "token_type_ids": types.to(device, non_blocking=True),
        "teacher_probs": torch.from_numpy(t.teacher_probs[idx]).to(device),
        "grades": torch.from_numpy(t.grades[idx]).to(device),
        "rationale": torch.from_numpy(t.rationale[idx]).to(device) if t.rationale is not None else None,
        "has_rationale": torch.from_numpy(t.has_rationale[idx]).to(device),
    }
    return batch


def make_optimizer(student: Student, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW: encoder at ``lr``, the small new parts at ``head_lr``; no decay on norms and biases."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2  # matrices decay; biases and norm scales (1-d) do not
        groups.setdefault((name.startswith("encoder."), decay), []).append(p)
    params = [
        {"params": ps, "lr": cfg.lr if enc else cfg.head_lr, "base_lr": cfg.lr if enc else cfg.head_lr, "weight_decay": cfg.weight_decay if decay else 0.0}
        for (enc, decay), ps in sorted(groups.items())
    ]
    return torch.optim.AdamW(params, betas=(0.9, cfg.adam_beta2), fused=False)


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up then linear decay to zero."""
    warm = max(1, int(total * warmup))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainResult:
    steps: int
    epochs: int
    seconds: float
    pairs: int
    pairs_per_s: float
    last: dict[str, float]
    history: list[dict[str, float]]
    resumed_from_step: int = 0
    epoch_metrics: list[dict[str, float]] = field(default_factory=list)
    skipped_steps: int = 0  # non-finite loss or gradient: the weights did not move


def _save_checkpoint(student: Student, opt: torch.optim.Optimizer, directory: Path, state: dict[str, Any]) -> None:
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_student(student, tmp)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save({"optimizer": opt.state_dict(), "rng": rng}, tmp / TRAINER_STATE)
    (tmp / TRAINER_JSON).write_text(json.dumps(state, indent=2))
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)


EpochHook = Callable[[Student, int], dict[str, float]]


def train(student: Student, ts: TrainingSet, cfg: TrainConfig, out_dir: str | Path, *, resume: bool = True, on_epoch_end: EpochHook | None = None) -> TrainResult:
    """Distil ``student`` on ``ts``; checkpoints under ``<out_dir>/checkpoint``.

    ``on_epoch_end(student, epoch)`` runs after each completed epoch (1-based; e.g. a
    dev-set evaluation); what it returns is logged and kept in ``epoch_metrics``. Its
    time is not counted in the throughput.

    With ``resume`` and a checkpoint of the same data and config there, the student's
    weights, the optimizer and the RNG are restored and training continues after the
    last checkpointed batch. (The caller loads the student from the checkpoint: see
    :func:`train_offline_frame`.)
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    ckpt = out_dir / CHECKPOINT_DIR
    device = next(student.parameters()).device
    opt = make_optimizer(student, cfg)
    n_batches = math.ceil(len(ts) / cfg.batch_size)
    total = cfg.epochs * n_batches
    stop = min(total, cfg.max_steps) if cfg.max_steps is not None else total
    fingerprint = ts.fingerprint()
    seed_everything(cfg.seed)
    start_epoch, start_batch, step = 0, 0, 0
    if resume and (ckpt / TRAINER_JSON).exists():
        state = json.loads((ckpt / TRAINER_JSON).read_text())
        if state.get("fingerprint") != fingerprint:
            raise CheckpointError(f"{ckpt} was written for other data (fingerprint {state.get('fingerprint')} vs {fingerprint}); use another --out or --no-resume")
        saved = state.get("train_config", {})
        for key in ("batch_size", "seed", "bucket_factor", "epochs"):
            if saved.get(key) != getattr(cfg, key):
                raise CheckpointError(f"{ckpt} was written with {key}={saved.get(key)}, this run has {getattr(cfg, key)}; use the same settings or --no-resume")
        blob = torch.load(ckpt / TRAINER_STATE, weights_only=True, map_location="cpu")
        opt.load_state_dict(blob["optimizer"])
        torch.set_rng_state(blob["rng"]["torch"])
        if "cuda" in blob["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(blob["rng"]["cuda"])
        start_epoch, start_batch, step = state["epoch"], state["batch"], state["step"]
        log.info("resuming from %s: epoch %d, batch %d, step %d", ckpt, start_epoch + 1, start_batch, step)
    resumed_from = step

    history: list[dict[str, float]] = []
    epoch_metrics: list[dict[str, float]] = []
    last: dict[str, float] = {}
    pairs = 0
    hook_seconds = 0.0
    skipped = 0
    t0 = time.perf_counter()
    student.train()
    done = step >= stop
    for epoch in range(start_epoch, cfg.epochs):
        if done:
            break
        batches = bucketed_batches(ts.lengths, cfg.batch_size, cfg.seed, epoch, cfg.bucket_factor)
        first = start_batch if epoch == start_epoch else 0
        epoch_done = False
        bar = tqdm(total=len(batches), initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not cfg.progress, leave=False)
        for b in range(first, len(batches)):
            batch = to_device(ts, batches[b], device)
            set_lr(opt, lr_factor(step, total, cfg.warmup))
            parts = train_step(student, opt, batch, cfg.loss, cfg.grad_clip)
            step += 1
            pairs += len(batches[b])
            if parts is None:
                skipped += 1
                log.warning("step %d skipped: non-finite loss or gradient", step)
                parts = {}
            last = parts or last
            if step % 50 == 0 or step == 1:
                history.append({"step": float(step), **parts})
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in parts.items()})
            at_epoch_end = epoch_done = b + 1 == len(batches)
            due = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or at_epoch_end or step >= stop
            if cfg.checkpoint and due:
                nxt_epoch, nxt_batch = (epoch + 1, 0) if at_epoch_end else (epoch, b + 1)
                state = {"epoch": nxt_epoch, "batch": nxt_batch, "step": step, "fingerprint": fingerprint, "train_config": cfg.to_dict()}
                _save_checkpoint(student, opt, ckpt, state)
            if step >= stop:
                done = True
                break
        bar.close()
        if on_epoch_end is not None and epoch_done:
            h0 = time.perf_counter()
            metrics = {"epoch": float(epoch + 1), "step": float(step), **on_epoch_end(student, epoch + 1)}
            student.train()
            hook_seconds += time.perf_counter() - h0
            epoch_metrics.append(metrics)
            log.info("epoch %d/%d done at step %d: %s", epoch + 1, cfg.epochs, step, {k: round(v, 4) for k, v in metrics.items() if k not in ("epoch", "step")})
    seconds = time.perf_counter() - t0 - hook_seconds
    rate = pairs / seconds if seconds > 0 else 0.0
    log.info("trained %d steps (%d pairs) in %.1fs: %.1f pairs/s; last loss %s", step - resumed_from, pairs, seconds, rate, {k: round(v, 4) for k, v in last.items()})
    return TrainResult(step, cfg.epochs, seconds, pairs, rate, last, history, resumed_from, epoch_metrics, skipped)


def train_offline_frame(
    df: pd.DataFrame,
    targets: Targets,
    cfg: TrainConfig,
    student_config: StudentConfig,
    out_dir: str | Path,
    *,
    resume: bool = True,
    keep_checkpoint: bool = False,
    trained_on: dict[str, Any] | None = None,
    eval_df: pd.DataFrame | None = None,
    student: Student | None = None,
) -> tuple[Student, dict[str, Any]]:
    """Build (or resume) a student, distil it on ``df`` with ``targets``, save it to ``out_dir``.

    ``student``, when given, is the initialised student to train instead of
    ``build_student(student_config)`` (e.g. one shrunk from a trained student); its config
    must be ``student_config``. A checkpoint in ``out_dir`` still wins when resuming.

    Writes the model folder (weights, config, tokenizer) and ``training.json`` (the
    configs, what it was trained on, the loss history, throughput and, with
    ``eval_df``, the metrics on it). Returns the student and that report.
    """
    from broadfast.training.metrics import evaluate

    out_dir = Path(out_dir)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt = out_dir / CHECKPOINT_DIR
    seed_everything(cfg.seed)
    if student is not None and student.config.to_dict() != student_config.to_dict():
        raise ValueError("the student given has another configuration than student_config")
    if resume and (ckpt / TRAINER_JSON).exists():
        student = load_student(ckpt, device)
        if student.config.to_dict() != student_config.to_dict():
            raise CheckpointError(f"{ckpt} holds a student with another configuration; use the same options or --no-resume")
    elif student is not None:
        student = student.to(device)
    else:
        student = build_student(student_config, device)
    counts = student.parameter_counts()
    log.info("student: %s extractor, %s parameters (extractor %s, head %s) on %s", student_config.extractor, f"{counts['inference']:,}", f"{counts['extractor']:,}", f"{counts['head']:,}", device)
    t0 = time.perf_counter()
    ts = prepare(student, df, targets)
    log.info("tokenised %d pairs in %.1fs (mean length %.1f tokens, max %d)", len(ts), time.perf_counter() - t0, float(ts.lengths.mean()), int(ts.lengths.max()))
    hook = None
    if eval_df is not None:
        eval_queries, eval_texts = pair_texts(eval_df)

        def hook(model: Student, epoch: int) -> dict[str, float]:
            return evaluate(eval_df, model.predict_proba(eval_queries, eval_texts, batch_size=128))

    result = train(student, ts, cfg, out_dir, resume=resume, on_epoch_end=hook)
    save_student(student, out_dir)
    report: dict[str, Any] = {
        "student": student_config.to_dict(),
        "train": cfg.to_dict(),
        "parameters": counts,
        "targets": targets.source,
        "rationale_rows": int(targets.has_rationale.sum()),
        "trained_on": trained_on or {},
        "steps": result.steps,
        "resumed_from_step": result.resumed_from_step,
        "seconds": round(result.seconds, 2),
        "pairs_per_s": round(result.pairs_per_s, 2),
        "device": str(device),
        "last_loss": result.last,
        "skipped_steps": result.skipped_steps,
        "history": result.history,
        "epoch_metrics": result.epoch_metrics,
        "metrics": {},
    }
    if eval_df is not None:
        if result.epoch_metrics and result.epoch_metrics[-1]["step"] == result.steps:
            report["metrics"] = {k: v for k, v in result.epoch_metrics[-1].items() if k not in ("epoch", "step")}
        else:  # stopped mid-epoch (max_steps) or nothing left to train after a resume
            report["metrics"] = evaluate(eval_df, student.predict_proba(eval_queries, eval_texts, batch_size=128))
        log.info("evaluation: %s", {k: round(v, 4) for k, v in report["metrics"].items()})
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2))
    if not keep_checkpoint and ckpt.exists():
        shutil.rmtree(ckpt)
    return student, report
