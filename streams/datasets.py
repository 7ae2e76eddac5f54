"""Relevance data sets: read and check a parquet file of labelled query–ad pairs.

The normalised schema (see ``../shared/data/README.md``): ``query``, ``product_id``,
``title``, ``description``, ``relevance`` (the set's own scale), ``grade`` (0/1/2).
Only ``query``, ``product_id`` and ``title`` are required; ``grade`` is needed wherever
the truth is (click model, oracle teacher, quality benchmarks).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from broadfast.errors import DataError

REQUIRED = ("query", "product_id", "title")


def load_pairs(path: str | Path, *, require_grade: bool = False) -> pd.DataFrame:
    """Read a parquet file of pairs, with string ids and an empty description where absent."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise DataError(f"cannot read {path} as parquet: {exc}") from exc
    needed = REQUIRED + (("grade",) if require_grade else ())
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise DataError(f"{path} lacks the column(s) {', '.join(missing)}; it has {', '.join(map(str, df.columns))}")
    df = df.copy()
    df["query"] = df["query"].astype(str)
    df["product_id"] = df["product_id"].astype(str)
    df["title"] = df["title"].fillna("").astype(str)
    df["description"] = df["description"].fillna("").astype(str) if "description" in df.columns else ""
    if "grade" in df.columns:
        if df["grade"].isna().any() or not df["grade"].isin([0, 1, 2]).all():
            raise DataError(f"{path}: 'grade' must be 0, 1 or 2 in every row")
        df["grade"] = df["grade"].astype(int)
    return df
