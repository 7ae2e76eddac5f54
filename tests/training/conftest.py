"""Fixtures of the training tests: a small slice of real pairs and synthetic teacher labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from broadfast.core.datasets import load_pairs
from broadfast.core.events import pair_id


@pytest.fixture(scope="session")
def pairs(shared_data: Path) -> pd.DataFrame:
    """48 real Home Depot dev pairs (a few whole queries)."""
    df = load_pairs(shared_data / "homedepot" / "dev.parquet", require_grade=True)
    return df.iloc[:48].reset_index(drop=True)


def make_labels(df: pd.DataFrame, k: int = 3, dim: int = 384, seed: int = 0, with_embeddings: bool = True) -> pd.DataFrame:
    """A labels file as `broadfast label --data --out` writes it: pair_id, probs, rationale embeddings.

    The probabilities lean toward the human grade; the embeddings are random unit vectors
    (the mechanics under test do not need real rationales).
    """
    rng = np.random.default_rng(seed)
    probs = np.full((len(df), 3), 0.1)
    probs[np.arange(len(df)), df["grade"].to_numpy()] = 0.8
    rows = {"pair_id": [pair_id(q, a) for q, a in zip(df["query"], df["ad_id"])], "probs": [p.tolist() for p in probs]}
    if with_embeddings:
        emb = rng.normal(size=(len(df), k, dim))
        emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
        rows["rationale_embeddings"] = [[list(map(float, v)) for v in e] for e in emb]
    return pd.DataFrame(rows)


@pytest.fixture
def labels_file(pairs: pd.DataFrame, tmp_path: Path) -> Path:
    path = tmp_path / "labels.parquet"
    make_labels(pairs).to_parquet(path, index=False)
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    """One torch thread: faster than two on these shared 2-core machines (measured)."""
    import torch

    torch.set_num_threads(1)
