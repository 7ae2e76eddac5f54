"""Windows of scored pairs for the monitoring tests (simulated models on real data sets)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from broadfast.simulation.clicks import noisy_oracle, score_pairs
from broadfast.core.datasets import load_pairs


@pytest.fixture(scope="session")
def homedepot_train(shared_data: Path) -> pd.DataFrame:
    return load_pairs(shared_data / "homedepot" / "train.parquet", require_grade=True)


@pytest.fixture(scope="session")
def homedepot_dev(shared_data: Path) -> pd.DataFrame:
    return load_pairs(shared_data / "homedepot" / "dev.parquet", require_grade=True)


@pytest.fixture(scope="session")
def crowdflower_dev(shared_data: Path) -> pd.DataFrame:
    return load_pairs(shared_data / "crowdflower" / "dev.parquet", require_grade=True)


def split_by_query(df: pd.DataFrame, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two query-disjoint halves of a data set (same distribution, different queries)."""
    queries = df["query"].unique()
    rng = np.random.default_rng(seed)
    first = set(rng.choice(queries, size=len(queries) // 2, replace=False))
    mask = df["query"].isin(first)
    return df[mask].reset_index(drop=True), df[~mask].reset_index(drop=True)


def lengthen_queries(df: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """The same pairs with each query made longer by words of other queries (a query-length shift)."""
    rng = np.random.default_rng(seed)
    vocab = np.array(sorted({w for q in df["query"] for w in q.split()}))
    out = df.copy()
    out["query"] = [q + " " + " ".join(rng.choice(vocab, size=3)) for q in out["query"]]
    return out


def scored(df: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Pairs scored by the simulated good model (reads the human grade; not a student)."""
    return score_pairs(df, noisy_oracle(), seed=seed)
