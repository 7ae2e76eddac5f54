"""Batch prediction: a parquet of pairs in, the same rows plus score and grade probabilities out.

Added columns: ``score`` (P(exact) + ½·P(partial)), ``p_irrelevant``, ``p_partial``,
``p_exact``. Pairs are tokenised once and scored in length-sorted batches, by the inference
backend ``BROADFAST_SERVE_BACKEND`` names (:mod:`broadfast.serving.backends`: PyTorch, or int8 by OpenVINO or ONNX Runtime,
converted once, cached next to the model and checked against PyTorch).

>>> from broadfast.model.student import StudentConfig, build_student
>>> pairs = pd.DataFrame({"query": ["drill", "hose"], "title": ["cordless drill", "garden hose"]})
>>> out = predict_frame(build_student(StudentConfig.tiny()), pairs)   # or load_student("model/"), load_pairs("dev.parquet")
>>> list(out.columns[-4:]), len(out), bool(out["score"].between(0, 1).all())
(['score', 'p_irrelevant', 'p_partial', 'p_exact'], 2, True)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from broadfast.core.datasets import load_pairs
from broadfast.core.events import score_from_probs
from broadfast.model.student import pair_texts
from broadfast.model.student import load_student

log = logging.getLogger(__name__)

OUTPUT_COLUMNS = ("score", "p_irrelevant", "p_partial", "p_exact")


def predict_frame(student: Any, df: pd.DataFrame, batch_size: int = 128, chunk: int = 8192, progress: bool = False) -> pd.DataFrame:
    """``df`` with the four prediction columns added (input order kept); ``student``: anything with ``predict_proba``."""
    queries, texts = pair_texts(df)
    parts = []
    for start in tqdm(range(0, len(df), chunk), desc="predict", unit="chunk", disable=not progress or len(df) <= chunk):
        parts.append(student.predict_proba(queries[start : start + chunk], texts[start : start + chunk], batch_size=batch_size))
    probs = np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.float32)
    out = df.copy()
    out["score"] = [score_from_probs(p) for p in probs]
    out["p_irrelevant"], out["p_partial"], out["p_exact"] = probs[:, 0], probs[:, 1], probs[:, 2]
    return out


def predict_file(
    model: str | Path, data: str | Path, out: str | Path, batch_size: int = 128, device: str | None = None, backend: str = "torch", threads: int = 1
) -> pd.DataFrame:
    """Score ``data`` with the model folder ``model`` and write ``out`` (parquet); ``backend``: a
    ``serve_backend`` value (``auto``, ``torch``, ``openvino-int8``, ``onnx-int8``), ``threads``: the int8 runtime's intra-op threads."""
    from broadfast.serving.backends import load_backend

    student = load_student(model, device)
    scorer = load_backend(student, Path(model), backend, student.device.type, threads)
    log.info("scoring with the %s backend", scorer.name)
    df = load_pairs(data)
    t0 = time.perf_counter()
    result = predict_frame(scorer, df, batch_size=batch_size, progress=True)
    seconds = time.perf_counter() - t0
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.to_parquet(out, index=False)
    log.info("scored %d pairs in %.1fs (%.0f pairs/s) → %s", len(df), seconds, len(df) / max(seconds, 1e-9), out)
    return result
