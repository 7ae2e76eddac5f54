"""Offline relevance metrics: NDCG@10 per query, Spearman, macro-F1 over the three grades.

NDCG uses the gain 2^(relevance − 1) − 1 on the data set's own scale (Home Depot 1–3,
CrowdFlower 1–4), so a pair judged 1 (the bottom) gains nothing. Queries whose pairs all
sit at the bottom have no ideal ranking and are left out of the mean.

>>> import pandas as pd
>>> df = pd.DataFrame({"query": ["q", "q"], "relevance": [3.0, 1.0], "grade": [2, 0]})
>>> round(evaluate(df, [[0.1, 0.1, 0.8], [0.8, 0.1, 0.1]])["ndcg@10"], 3)
1.0
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def scores_of(probs: np.ndarray) -> np.ndarray:
    """P(exact) + ½·P(partial) for each row of an (n, 3) array (``broadfast.core.events.score_from_probs``, vectorised)."""
    probs = np.asarray(probs, dtype=np.float64)
    return probs[:, 2] + 0.5 * probs[:, 1]


def ndcg_at_k(query: np.ndarray, relevance: np.ndarray, score: np.ndarray, k: int = 10) -> tuple[float, int]:
    """Mean NDCG@k over queries with a non-zero ideal DCG, and how many queries that was."""
    frame = pd.DataFrame({"q": query, "gain": np.power(2.0, relevance - 1.0) - 1.0, "s": score})
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    values = []
    for _, group in frame.groupby("q", sort=False):
        ideal = np.sort(group["gain"].to_numpy())[::-1][:k]
        idcg = float((ideal * discounts[: len(ideal)]).sum())
        if idcg <= 0:
            continue
        ranked = group.sort_values("s", ascending=False, kind="stable")["gain"].to_numpy()[:k]
        values.append(float((ranked * discounts[: len(ranked)]).sum()) / idcg)
    return (float(np.mean(values)) if values else float("nan")), len(values)


def evaluate(df: pd.DataFrame, probs: Any, k: int = 10) -> dict[str, float]:
    """NDCG@k, Spearman(score, relevance) and macro-F1(argmax grade) of predictions on ``df``."""
    from scipy.stats import spearmanr
    from sklearn.metrics import f1_score

    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(df), 3):
        raise ValueError(f"expected probabilities of shape ({len(df)}, 3), got {probs.shape}")
    score = scores_of(probs)
    out: dict[str, float] = {"pairs": float(len(df))}
    if "relevance" in df.columns:
        rel = df["relevance"].to_numpy(dtype=np.float64)
        out[f"ndcg@{k}"], out["queries"] = ndcg_at_k(df["query"].to_numpy(), rel, score, k)
        out["spearman"] = float(spearmanr(score, rel).statistic)
    if "grade" in df.columns:
        out["macro_f1"] = float(f1_score(df["grade"].to_numpy(), probs.argmax(1), average="macro", labels=[0, 1, 2], zero_division=0))
    return out
