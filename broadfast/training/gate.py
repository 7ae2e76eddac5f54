"""The publish gate: a candidate goes live only when it holds up against the champion on a fixed slice.

Both models are measured the same way — the same code on the same fixed, query-disjoint
validation slice (the champion once, when it becomes champion; the candidate at each
publish). The rule that decides:

    publish  ⇔  candidate ≥ best − tolerance

where *best* is the highest score any champion of this trainer has had on the slice (a
high-water mark that only rises). Every published version is therefore at least
``best − tolerance`` and *best* never falls, so repeated publishes cannot add up to a slide:
no champion is ever below the first champion's score minus one tolerance.

The gate also knows the slice's noise: a paired bootstrap over validation *queries* (whole
queries are resampled, as they are the unit of the slice) gives an interval for the
candidate's difference from the champion, and every verdict says it — so "refused, −0.004
[−0.05, +0.04]" reads as noise and "refused, −0.09 [−0.13, −0.05]" as a real drop.

>>> import pandas as pd, numpy as np
>>> val = pd.DataFrame({"query": list("aabbcc"), "relevance": [3.0, 1.0, 2.0, 1.0, 3.0, 2.0], "grade": [2, 0, 1, 0, 2, 1]})
>>> gate = Gate(val, GateConfig(metric="spearman", tolerance=0.05))
>>> good = np.array([[0, .1, .9], [.9, .1, 0], [0, .9, .1], [.9, .1, 0], [0, 0, 1], [0, 1, 0]])
>>> champion = gate.measure_probs(good)
>>> gate.judge(gate.measure_probs(good[::-1]), champion, best=champion.value).publish
False
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from broadfast.core.settings import TrainingSettings
from broadfast.training.metrics import evaluate, ndcg_at_k, scores_of

Metric = Literal["spearman", "ndcg@10", "macro_f1"]


def high_water(*values: float) -> float:
    """The largest finite value (``-inf`` when none is): a NaN score never switches the floor off."""
    finite = [v for v in values if np.isfinite(v)]
    return max(finite) if finite else float("-inf")


@dataclass(frozen=True)
class GateConfig:
    metric: Metric = "spearman"
    tolerance: float = 0.03  # BROADFAST_ONLINE_GATE_TOLERANCE's default
    resamples: int = 400
    confidence: float = 0.90
    seed: int = 0

    @classmethod
    def from_settings(cls, training: TrainingSettings) -> GateConfig:
        return cls(metric=training.online_gate_metric, tolerance=training.online_gate_tolerance, resamples=training.online_gate_resamples)


@dataclass(frozen=True)
class Measured:
    """A model's predictions on the slice and its metrics (``value`` is the gate's metric)."""

    probs: np.ndarray
    metrics: dict[str, float]
    value: float


@dataclass(frozen=True)
class Verdict:
    publish: bool
    reason: str
    candidate: float
    champion: float
    floor: float
    delta: float  # candidate − champion
    interval: tuple[float, float]  # bootstrap interval of delta


class Gate:
    """Measures models on one validation slice and judges candidates against the champion."""

    def __init__(self, val: pd.DataFrame, config: GateConfig | None = None) -> None:
        self.val = val.reset_index(drop=True)
        self.config = config or GateConfig()
        codes, self.queries = pd.factorize(self.val["query"])
        self._rows_of = [np.flatnonzero(codes == q) for q in range(len(self.queries))]
        h = hashlib.blake2b(digest_size=8)
        h.update(self.config.metric.encode())
        for column in ("query", "title", "relevance"):
            if column in self.val.columns:
                h.update(pd.util.hash_pandas_object(self.val[column], index=False).to_numpy().tobytes())
        self.fingerprint = h.hexdigest()  # the slice and the metric: scores measured on another are not comparable

    def measure_probs(self, probs: np.ndarray) -> Measured:
        metrics = evaluate(self.val, probs)
        return Measured(np.asarray(probs, dtype=np.float64), metrics, float(metrics.get(self.config.metric, float("nan"))))

    def measure(self, model: Any) -> Measured:
        """Score the slice with ``model`` (anything with ``predict_proba(queries, texts)``)."""
        from broadfast.model.student import pair_texts

        queries, texts = pair_texts(self.val)
        return self.measure_probs(model.predict_proba(queries, texts, batch_size=64))

    def _metric(self, idx: np.ndarray, probs: np.ndarray) -> float:
        """Spearman or macro-F1 on rows ``idx`` (a resample of whole queries; NDCG is per query, see :meth:`interval`)."""
        from scipy.stats import spearmanr
        from sklearn.metrics import f1_score

        m = self.config.metric
        if m == "spearman":
            return float(spearmanr(scores_of(probs[idx]), self.val["relevance"].to_numpy()[idx]).statistic)
        return float(f1_score(self.val["grade"].to_numpy()[idx], probs[idx].argmax(1), average="macro", labels=[0, 1, 2], zero_division=0))

    def interval(self, candidate: Measured, champion: Measured) -> tuple[float, float]:
        """Paired bootstrap over queries of (candidate − champion): the central ``confidence`` interval."""
        cfg = self.config
        n_q = len(self._rows_of)
        if n_q < 2:
            return (float("nan"), float("nan"))
        rng = np.random.default_rng(cfg.seed)
        deltas = []
        for _ in range(cfg.resamples):
            picked = rng.integers(0, n_q, n_q)
            idx = np.concatenate([self._rows_of[q] for q in picked])
            if cfg.metric == "ndcg@10":  # a query drawn twice counts twice: number the copies apart
                owner = np.concatenate([np.full(len(self._rows_of[q]), j) for j, q in enumerate(picked)])
                rel = self.val["relevance"].to_numpy()[idx]
                d = ndcg_at_k(owner, rel, scores_of(candidate.probs[idx]))[0] - ndcg_at_k(owner, rel, scores_of(champion.probs[idx]))[0]
            else:
                d = self._metric(idx, candidate.probs) - self._metric(idx, champion.probs)
            if np.isfinite(d):
                deltas.append(d)
        if not deltas:
            return (float("nan"), float("nan"))
        tail = (1.0 - cfg.confidence) / 2.0 * 100.0
        lo, hi = np.percentile(deltas, [tail, 100.0 - tail])
        return (float(lo), float(hi))

    def judge(self, candidate: Measured, champion: Measured, best: float) -> Verdict:
        """Publish when ``candidate ≥ best − tolerance`` (``best``: the high-water mark of champions' scores)."""
        cfg = self.config
        best = high_water(best, champion.value)
        floor = best - cfg.tolerance
        delta = candidate.value - champion.value
        lo, hi = self.interval(candidate, champion)
        noise = f"vs champion {delta:+.4f} [{cfg.confidence:.0%} interval {lo:+.4f}, {hi:+.4f} over {len(self._rows_of)} queries]"
        m = cfg.metric
        if not np.isfinite(candidate.value):
            return Verdict(False, f"{m} of the candidate is not a number; {noise}", candidate.value, champion.value, floor, delta, (lo, hi))
        if candidate.value < floor:
            why = f"{m} {candidate.value:.4f} < floor {floor:.4f} (best champion {best:.4f} − tolerance {cfg.tolerance}); {noise}"
            if hi < 0:
                why += ": a real drop, beyond the slice's noise"
            elif lo <= 0 <= hi:
                why += ": within the slice's noise of the champion, but below the floor"
            return Verdict(False, why, candidate.value, champion.value, floor, delta, (lo, hi))
        why = f"{m} {candidate.value:.4f} ≥ floor {floor:.4f} (best champion {best:.4f} − tolerance {cfg.tolerance}); {noise}"
        return Verdict(True, why, candidate.value, champion.value, floor, delta, (lo, hi))
