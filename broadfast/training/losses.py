"""LRKD losses: KD to the teacher's soft grades, CE to human grades, latent–rationale alignment.

``total = kd_weight · T² · KL(teacher_T ‖ student_T) + ce_weight · CE(grade)
+ align_weight · align(latent_k → rationale_k)``, each term over the rows that have
its target (a grade of -1 means none; a row without rationale embeddings is left out
of the alignment term).

The ablations of the paper are switches: ``StudentConfig.extractor="none"`` is plain KD;
``align_weight=0`` is the extractor without alignment; both on is full LRKD.

>>> import torch
>>> cfg = LossConfig()
>>> kd_loss(torch.zeros(2, 3), torch.full((2, 3), 1 / 3), cfg.temperature).item() < 1e-6
True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from broadfast.model.student import StudentOutput


@dataclass
class LossConfig:
    """Weights and shapes of the LRKD objective (saved with a training run)."""

    kd_weight: float = 1.0
    ce_weight: float = 0.5
    align_weight: float = 0.5  # λ; 0 switches alignment off
    temperature: float = 2.0
    align_kind: Literal["cosine", "mse"] = "cosine"

    def to_dict(self) -> dict[str, float | str]:
        return asdict(self)


def soften(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Teacher probabilities at temperature T: p^(1/T), renormalised."""
    if temperature == 1.0:
        return probs
    logp = probs.clamp(min=1e-8).log() / temperature
    return logp.softmax(-1)


def weighted_mean(per_row: torch.Tensor, weights: torch.Tensor | None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of ``weights × per_row`` over the rows in ``mask``, divided by the number of those rows.

    With weights in [0, 1] (the teacher's confidence) a batch of unsure labels takes a smaller
    step than a batch of sure ones, not just a differently mixed one. Weights of 1 (the default)
    give the plain mean. Zero (still attached to the graph) when no row is selected.
    """
    w = torch.ones_like(per_row) if weights is None else weights.to(per_row.dtype)
    selected = torch.ones_like(per_row) if mask is None else mask.to(per_row.dtype)
    count = selected.sum()
    if float(count) <= 0.0:
        return per_row.sum() * 0.0
    return (per_row * w * selected).sum() / count


def kd_loss(logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float, mask: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """T²·KL(teacher_T ‖ student_T), averaged over the rows in ``mask`` (all rows by default), weighted by ``weights``."""
    target = soften(teacher_probs.float(), temperature)
    logq = F.log_softmax(logits.float() / temperature, dim=-1)
    per_row = (target * (target.clamp(min=1e-8).log() - logq)).sum(-1)
    return weighted_mean(per_row, weights, mask) * temperature**2


def ce_loss(logits: torch.Tensor, grades: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy to human grades; rows with grade -1 are ignored (zero if none has one)."""
    has = grades >= 0
    if not has.any():
        return logits.sum() * 0.0
    per_row = F.cross_entropy(logits.float(), grades.clamp(min=0), reduction="none")
    return weighted_mean(per_row, weights, has)


def align_loss(aligned: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Pull latent k (projected to the rationale space) toward rationale embedding k.

    ``aligned`` and ``targets`` are (B, K, D); ``mask`` (B,) marks rows with rationales.
    """
    if not mask.any():
        return aligned.sum() * 0.0
    a, t = aligned[mask].float(), targets[mask].float()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(a, t, dim=-1)).mean()
    if kind == "mse":
        return ((a - t) ** 2).sum(-1).mean()  # squared distance per latent vector
    raise ValueError(f"align_kind must be 'cosine' or 'mse', got {kind!r}")


def lrkd_loss(
    out: StudentOutput,
    teacher_probs: torch.Tensor,
    grades: torch.Tensor,
    rationale: torch.Tensor | None,
    has_rationale: torch.Tensor | None,
    cfg: LossConfig,
    has_teacher: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The total LRKD loss of a batch and its parts (as floats, for logging).

    ``weights`` (B,) weigh the rows of the KD and CE terms (e.g. the teacher's confidence);
    all rows weigh 1 by default.
    """
    kd = kd_loss(out.logits, teacher_probs, cfg.temperature, has_teacher, weights)
    total = cfg.kd_weight * kd
    parts = {"kd": float(kd.detach())}
    if cfg.ce_weight > 0:
        ce = ce_loss(out.logits, grades, weights)
        total = total + cfg.ce_weight * ce
        parts["ce"] = float(ce.detach())
    if cfg.align_weight > 0 and out.aligned is not None and rationale is not None and has_rationale is not None:
        al = align_loss(out.aligned, rationale, has_rationale, cfg.align_kind)
        total = total + cfg.align_weight * al
        parts["align"] = float(al.detach())
    parts["total"] = float(total.detach())
    return total, parts
