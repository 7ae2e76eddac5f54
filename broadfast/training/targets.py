"""Training targets: the teacher labels file, or the data's own human judgements.

A labels file is a parquet (written by ``broadfast label --data … --out …``) with:

* a key: ``pair_id``, or ``query`` + ``product_id`` (or ``ad_id``), from which the
  pair id is computed with :func:`broadfast.core.events.pair_id`;
* the teacher's grade distribution: ``probs`` (3 floats), or the three columns
  ``p_irrelevant``, ``p_partial``, ``p_exact``;
* optionally ``rationale_embeddings``: per row a list of K lists of 384 floats (one
  per perspective, in perspective order); or ``rationales`` (K texts per row), which are
  then embedded here with the packaged MiniLM (:func:`broadfast.model.embedder.shared_embedder`).
  Rows with neither are left out of the alignment loss; a file with neither column trains
  without alignment.

Without a labels file the data's human judgements are the teacher: ``relevance`` spread
linearly over the two neighbouring grades (so the expected score P(exact) + ½·P(partial)
is linear in the judgement), or the ``grade`` one-hot with label smoothing.

>>> relevance_to_probs(np.array([1.0, 2.5, 3.0]), 1.0, 3.0).round(2).tolist()
[[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from broadfast.core.datasets import to_vocabulary
from broadfast.core.events import pair_id
from broadfast.model.errors import LabelsError

log = logging.getLogger(__name__)

PROB_COLUMNS = ("p_irrelevant", "p_partial", "p_exact")


@dataclass
class Targets:
    """Per-row targets aligned with a data frame's rows."""

    teacher_probs: np.ndarray  # (n, 3) float32
    grades: np.ndarray  # (n,) int64, -1 where there is no human grade
    rationale: np.ndarray | None  # (n, K, D) float32
    has_rationale: np.ndarray  # (n,) bool
    source: str  # "labels", "relevance" or "grade"


def relevance_to_probs(relevance: np.ndarray, low: float, high: float) -> np.ndarray:
    """Spread a graded judgement on [low, high] over the two neighbouring grades of 0–2."""
    if high <= low:
        raise LabelsError(f"relevance scale [{low}, {high}] is empty")
    x = np.clip((np.asarray(relevance, dtype=np.float64) - low) / (high - low) * 2.0, 0.0, 2.0)
    lower = np.minimum(np.floor(x).astype(int), 1)
    frac = x - lower
    probs = np.zeros((len(x), 3), dtype=np.float64)
    probs[np.arange(len(x)), lower] = 1.0 - frac
    probs[np.arange(len(x)), lower + 1] += frac
    return probs.astype(np.float32)


def grade_to_probs(grades: np.ndarray, smoothing: float = 0.1) -> np.ndarray:
    """One-hot grades with label smoothing."""
    probs = np.full((len(grades), 3), smoothing / 3.0, dtype=np.float32)
    probs[np.arange(len(grades)), np.asarray(grades, dtype=int)] += 1.0 - smoothing
    return probs


def human_targets(df: pd.DataFrame, kind: str = "relevance", smoothing: float = 0.1, scale: tuple[float, float] | None = None) -> Targets:
    """Targets from the data's own judgements (``kind``: ``relevance`` or ``grade``)."""
    grades = df["grade"].to_numpy(dtype=np.int64) if "grade" in df.columns else np.full(len(df), -1, dtype=np.int64)
    if kind == "relevance":
        if "relevance" not in df.columns:
            raise LabelsError("targets 'relevance' need a 'relevance' column; use targets 'grade' instead")
        rel = df["relevance"].to_numpy(dtype=np.float64)
        low, high = scale if scale is not None else (float(np.nanmin(rel)), float(np.nanmax(rel)))
        log.info("teacher = human relevance on the scale [%g, %g], spread over neighbouring grades", low, high)
        probs = relevance_to_probs(rel, low, high)
    elif kind == "grade":
        if "grade" not in df.columns:
            raise LabelsError("the data has no 'grade' column and no labels file was given: nothing to learn from")
        probs = grade_to_probs(grades, smoothing)
    else:
        raise LabelsError(f"targets must be 'relevance' or 'grade', got {kind!r}")
    return Targets(probs, grades, None, np.zeros(len(df), dtype=bool), kind)


def read_labels(path: str | Path) -> pd.DataFrame:
    """Read a labels file into columns ``pair_id``, ``probs`` (list of 3) and ``rationale_embeddings`` (or None)."""
    path = Path(path)
    if not path.exists():
        raise LabelsError(f"labels file not found: {path}")
    try:
        raw = pd.read_parquet(path)
    except Exception as exc:
        raise LabelsError(f"cannot read {path} as parquet: {exc}") from exc
    if "pair_id" in raw.columns:
        ids = raw["pair_id"].astype(str)
    elif "query" in raw.columns and "ad_id" in (raw := to_vocabulary(raw)).columns:
        ad = raw["ad_id"]
        ids = pd.Series([pair_id(str(q), str(a)) for q, a in zip(raw["query"], ad)], index=raw.index)
    else:
        raise LabelsError(f"{path} needs a 'pair_id' column or 'query' + 'ad_id'; it has {', '.join(map(str, raw.columns))}")
    if "probs" in raw.columns:
        probs = np.stack([np.asarray(p, dtype=np.float64) for p in raw["probs"]]) if len(raw) else np.zeros((0, 3))
    elif all(c in raw.columns for c in PROB_COLUMNS):
        probs = raw[list(PROB_COLUMNS)].to_numpy(dtype=np.float64)
    else:
        raise LabelsError(f"{path} needs a 'probs' column or the columns {', '.join(PROB_COLUMNS)}")
    if probs.ndim != 2 or probs.shape[1] != 3:
        raise LabelsError(f"{path}: 'probs' must hold three probabilities per row")
    bad = ~np.isfinite(probs).all(1) | (probs < 0).any(1) | (np.abs(probs.sum(1) - 1.0) > 1e-3)
    if bad.any():
        raise LabelsError(f"{path}: {int(bad.sum())} row(s) have probabilities that are not a distribution (first at row {int(np.argmax(bad))})")
    out = pd.DataFrame({"pair_id": ids.to_numpy(), "probs": list(probs.astype(np.float32))})
    out["rationale_embeddings"] = raw["rationale_embeddings"].to_numpy() if "rationale_embeddings" in raw.columns else None
    out["rationales"] = raw["rationales"].to_numpy() if "rationales" in raw.columns else None
    dupes = out["pair_id"].duplicated(keep="last")
    if dupes.any():
        log.info("%s: %d duplicate pair(s); the last label of each wins", path, int(dupes.sum()))
        out = out[~dupes]
    return out.reset_index(drop=True)


def _embedding_array(value: object, k: int, dim: int) -> np.ndarray | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    try:
        arr = np.stack([np.asarray(row, dtype=np.float32) for row in value])  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    if arr.shape != (k, dim) or not np.isfinite(arr).all():
        return None
    return arr


def _embed_missing(embeddings: list[np.ndarray | None], rationales: list[object], k: int, dim: int) -> None:
    """Embed the rationale texts of rows that carry texts (K of them) but no embeddings, in place."""
    todo = [i for i, (e, r) in enumerate(zip(embeddings, rationales)) if e is None and r is not None and not isinstance(r, float) and len(r) == k]  # type: ignore[arg-type]
    if not todo:
        return
    from broadfast.model.embedder import shared_embedder

    texts = [str(t) for i in todo for t in rationales[i]]  # type: ignore[union-attr]
    log.info("embedding %d rationales of %d labels with the packaged MiniLM", len(texts), len(todo))
    vecs = shared_embedder().encode(texts)
    if vecs.shape[1] != dim:
        raise LabelsError(f"rationale embeddings are {vecs.shape[1]}-d, the student aligns to {dim}-d")
    for n, i in enumerate(todo):
        embeddings[i] = vecs[n * k : (n + 1) * k]


def label_targets(df: pd.DataFrame, labels: pd.DataFrame, k: int, dim: int) -> tuple[pd.DataFrame, Targets]:
    """Join labels to data rows on the pair id; returns the labelled rows and their targets."""
    keys = pd.Series([pair_id(q, a) for q, a in zip(df["query"], df["ad_id"])], index=df.index)
    index = pd.Series(np.arange(len(labels)), index=labels["pair_id"].to_numpy())
    where = keys.map(index)
    keep = where.notna().to_numpy()
    if not keep.any():
        raise LabelsError("no row of the data matches a label (joined on pair_id = hash of normalised query + product_id)")
    rows = df[keep].reset_index(drop=True)
    matched = labels.iloc[where[keep].astype(int).to_numpy()].reset_index(drop=True)
    log.info("labels cover %d of %d data rows", len(rows), len(df))
    probs = np.stack(matched["probs"].to_list()).astype(np.float32)
    grades = rows["grade"].to_numpy(dtype=np.int64) if "grade" in rows.columns else np.full(len(rows), -1, dtype=np.int64)
    embeddings = [_embedding_array(v, k, dim) for v in matched["rationale_embeddings"]]
    _embed_missing(embeddings, matched["rationales"].to_list(), k, dim)
    has = np.array([e is not None for e in embeddings], dtype=bool)
    rationale = None
    if has.any():
        rationale = np.zeros((len(rows), k, dim), dtype=np.float32)
        for i, e in enumerate(embeddings):
            if e is not None:
                rationale[i] = e
    wrong = int(sum(1 for v, e in zip(matched["rationale_embeddings"], embeddings) if e is None and v is not None and not (isinstance(v, float) and np.isnan(v))))
    if wrong:
        log.warning("%d label(s) carry rationale embeddings that are not %d × %d finite floats: left out of alignment", wrong, k, dim)
    log.info("rationale embeddings on %d of %d labelled rows (alignment %s)", int(has.sum()), len(rows), "on" if has.any() else "off")
    return rows, Targets(probs, grades, rationale, has, "labels")
