"""One optimizer step of the LRKD objective: the one training step the offline and online trainers share.

A batch is a dict of tensors on the student's device: ``input_ids``, ``attention_mask``,
``token_type_ids``, ``teacher_probs`` (B, 3), ``grades`` (B,; -1 where there is none),
``rationale`` (B, K, D) or None, ``has_rationale`` (B,) and optionally ``weights`` (B,).

A step whose loss or gradient is not finite is skipped (no parameter moves, the optimizer
state is untouched) and reported as None: one bad batch never reaches the weights.

>>> lr_scale(0, warmup_steps=4), lr_scale(3, warmup_steps=4), lr_scale(399, warmup_steps=4, schedule="inverse_sqrt")
(0.25, 1.0, 0.1)
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from broadfast.training.losses import LossConfig, lrkd_loss
from broadfast.model.student import Student, autocast

Schedule = Literal["constant", "inverse_sqrt"]


def set_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    """Every parameter group at ``factor`` × its base learning rate."""
    for group in opt.param_groups:
        group["lr"] = group["base_lr"] * factor


def lr_scale(step: int, warmup_steps: int, schedule: Schedule = "constant", floor: float = 0.0) -> float:
    """A schedule for a stream of unknown length: linear warm-up, then constant or 1/√step, never below ``floor``.

    ``step`` counts from 0. Unlike the offline linear decay it needs no total step count; the
    floor keeps a learner that runs for days from freezing.
    """
    warm = max(1, warmup_steps)
    if step < warm:
        return (step + 1) / warm
    if schedule == "constant":
        return 1.0
    if schedule == "inverse_sqrt":
        return max(floor, math.sqrt(warm / (step + 1)))
    raise ValueError(f"schedule must be 'constant' or 'inverse_sqrt', got {schedule!r}")


def train_step(student: Student, opt: torch.optim.Optimizer, batch: dict[str, Any], loss: LossConfig, grad_clip: float = 1.0) -> dict[str, float] | None:
    """Forward, LRKD loss, backward, clip, step. Returns the loss parts, or None when the step was skipped
    because the loss or the gradient norm was not finite."""
    student.train()
    with autocast(next(student.parameters()).device):
        out = student(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    total, parts = lrkd_loss(out, batch["teacher_probs"], batch["grades"], batch.get("rationale"), batch.get("has_rationale"), loss, weights=batch.get("weights"))
    opt.zero_grad(set_to_none=True)
    if not torch.isfinite(total):
        return None
    total.backward()
    norm = torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip if grad_clip else float("inf"))
    if not torch.isfinite(norm):
        opt.zero_grad(set_to_none=True)
        return None
    opt.step()
    return parts
