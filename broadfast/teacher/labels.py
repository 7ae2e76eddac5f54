"""Teacher labels as events and as files: rationale embeddings, ``TeacherLabel``, batch parquet.

``label_file`` is ``broadfast label --data FILE --out FILE``: it labels a parquet file of pairs
in batches with a progress bar and writes one row per labelled pair (the columns of
:data:`LABEL_COLUMNS`, read by ``broadfast train offline --labels``, then ``perspective_probs``,
``perspective_mass``, ``confidence``, ``human_grade`` (the oracle's; -1 for a model) and
``failed_perspectives`` ("name: reason" each; a label may be aggregated from fewer than all
perspectives). Pairs the teacher could not label at all are not written there: they go to
``<out stem>.failures.parquet`` with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from broadfast.core.events import FailedPerspective, HardCase, Perspective, TeacherLabel, now, pair_id
from broadfast.teacher.errors import LabelDataError
from broadfast.teacher.mpcot import Label, LabelFailure, Pair, Teacher

log = logging.getLogger(__name__)

LABEL_COLUMNS = (
    "query",
    "ad_id",
    "pair_id",
    "p_irrelevant",
    "p_partial",
    "p_exact",
    "probs",
    "perspectives",
    "rationales",
    "rationale_embeddings",
    "teacher_id",
)
# Written after "rationales" too; not needed by `train offline --labels`.
EXTRA_COLUMNS = ("perspective_probs", "perspective_mass", "confidence", "human_grade", "failed_perspectives")


def pair_from_hardcase(hc: HardCase) -> Pair:
    return Pair(pair_id=hc.pair_id, query=hc.query, ad_id=hc.ad_id, title=hc.title, text=hc.text)


def embed_rationales(labels: Sequence[Label], embedder: Any | None = None) -> list[np.ndarray]:
    """One (K, 384) array of unit-norm MiniLM embeddings per label (K perspectives), one encode call."""
    if not labels:
        return []
    if embedder is None:
        from broadfast.model.embedder import shared_embedder

        embedder = shared_embedder()
    texts = [p.rationale for lab in labels for p in lab.perspectives]
    vecs = embedder.encode(texts)
    out, start = [], 0
    for lab in labels:
        k = len(lab.perspectives)
        out.append(vecs[start : start + k])
        start += k
    return out


def to_event(label: Label, embeddings: np.ndarray, first_scored_ts: float | None = None) -> TeacherLabel:
    return TeacherLabel(
        pair_id=label.pair.pair_id,
        query=label.pair.query,
        ad_id=label.pair.ad_id,
        title=label.pair.title,
        text=label.pair.text,
        perspectives=[Perspective(name=p.name, rationale=p.rationale, probs=p.probs, mass=p.mass) for p in label.perspectives],
        probs=label.probs,
        rationale_embeddings=[[float(x) for x in row] for row in embeddings],
        teacher_id=label.teacher_id,
        ts=now(),
        first_scored_ts=first_scored_ts,
        confidence=label.confidence,
        grade=label.grade,
        failed_perspectives=[FailedPerspective(name=f.name, reason=f.reason) for f in label.failed_perspectives],
    )


def label_rows(labels: Sequence[Label], embeddings: Sequence[np.ndarray]) -> list[dict[str, Any]]:
    return [
        {
            "query": lab.pair.query,
            "ad_id": lab.pair.ad_id,
            "pair_id": lab.pair.pair_id,
            "p_irrelevant": lab.probs[0],
            "p_partial": lab.probs[1],
            "p_exact": lab.probs[2],
            "probs": list(lab.probs),
            "perspectives": [p.name for p in lab.perspectives],
            "rationales": [p.rationale for p in lab.perspectives],
            "perspective_probs": [list(p.probs) for p in lab.perspectives],
            "perspective_mass": [float("nan") if p.mass is None else float(p.mass) for p in lab.perspectives],
            "confidence": float("nan") if lab.confidence is None else float(lab.confidence),
            "human_grade": -1 if lab.grade is None else int(lab.grade),
            "failed_perspectives": [f"{f.name}: {f.reason}" for f in lab.failed_perspectives],
            "rationale_embeddings": [[float(x) for x in row] for row in emb],
            "teacher_id": lab.teacher_id,
        }
        for lab, emb in zip(labels, embeddings)
    ]


def failures_path(out: Path) -> Path:
    return out.with_name(out.stem + ".failures.parquet")


def label_file(
    teacher: Teacher,
    data: Path,
    out: Path,
    *,
    batch_size: int = 16,
    limit: int | None = None,
    embedder: Any | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Label every pair of ``data`` (parquet), write ``out``; returns counts and throughput."""
    import time

    import pandas as pd
    from tqdm import tqdm

    from broadfast.core.datasets import load_pairs

    df = load_pairs(data)
    if limit is not None:
        df = df.head(limit)
    if df.empty:
        raise LabelDataError(f"{data} has no pairs to label")
    pairs = [
        Pair(pair_id(q, ad), q, ad, t, d)
        for q, ad, t, d in zip(df["query"], df["ad_id"], df["title"], df["text"])
    ]
    rows: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    tokens = 0
    t0 = time.perf_counter()
    with tqdm(total=len(pairs), desc=f"labelling with {teacher.teacher_id}", unit="pair", disable=not progress) as bar:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            results = teacher.label(chunk)
            ok = [r for r in results if isinstance(r, Label)]
            failed.extend({"pair_id": r.pair.pair_id, "query": r.pair.query, "ad_id": r.pair.ad_id, "reason": r.reason} for r in results if isinstance(r, LabelFailure))
            rows.extend(label_rows(ok, embed_rationales(ok, embedder)))
            tokens += sum(r.tokens for r in ok)
            bar.update(len(chunk))
            bar.set_postfix(failed=len(failed))
    seconds = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=[*LABEL_COLUMNS[:9], *EXTRA_COLUMNS, *LABEL_COLUMNS[9:]]).to_parquet(out, index=False)
    fpath = failures_path(out)
    if failed:
        pd.DataFrame(failed).to_parquet(fpath, index=False)
        log.warning("%d of %d pairs could not be labelled; reasons in %s", len(failed), len(pairs), fpath)
    elif fpath.exists():
        fpath.unlink()
    partial = sum(1 for r in rows if r["failed_perspectives"])
    if partial:
        log.warning("%d of %d labels were aggregated from fewer than all perspectives (see the failed_perspectives column)", partial, len(rows))
    return {"pairs": len(pairs), "labelled": len(rows), "failed": len(failed), "partial": partial, "seconds": seconds, "tokens": tokens, "out": str(out)}
