"""Relevance data sets: read and check a parquet file of labelled query–ad pairs.

The files' schema (see ``../shared/data/README.md``): ``query``, ``product_id``, ``title``,
``description``, ``relevance`` (the set's own scale), ``grade`` (0/1/2). Only ``query``,
``product_id`` and ``title`` are required; ``grade`` is needed wherever the truth is (click
model, oracle teacher, quality benchmarks).

This is the boundary where the files' names meet the project's one vocabulary for an ad,
``ad_id``, ``title``, ``text`` (as in the events and the scoring API): :func:`load_pairs` maps
``product_id`` → ``ad_id`` and ``description`` → ``text`` (:data:`FILE_COLUMNS`), and nothing
past it uses the files' names. A file the project wrote in its own names reads the same.

>>> import pandas as pd
>>> to_vocabulary(pd.DataFrame({"query": ["q"], "product_id": [7], "title": ["t"], "description": ["d"]})).columns.tolist()
['query', 'ad_id', 'title', 'text']
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from broadfast.core.errors import DataError

FILE_COLUMNS = {"product_id": "ad_id", "description": "text"}  # the data files' names → the project's
FILE_NAME_OF = {ours: theirs for theirs, ours in FILE_COLUMNS.items()}
REQUIRED = ("query", "ad_id", "title")


def to_vocabulary(df: pd.DataFrame) -> pd.DataFrame:
    """A frame of the data files' columns with the project's names for the ad (``ad_id``, ``text``)."""
    return df.rename(columns=FILE_COLUMNS)


def load_pairs(path: str | Path, *, require_grade: bool = False) -> pd.DataFrame:
    """Read a parquet file of pairs in the project's vocabulary (``ad_id``, ``title``, ``text``), with string ids and an empty text where absent."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise DataError(f"cannot read {path} as parquet: {exc}") from exc
    df = to_vocabulary(df)
    needed = REQUIRED + (("grade",) if require_grade else ())
    missing = [c for c in needed if c not in df.columns]
    if missing:
        named = [f"{c} (or {FILE_NAME_OF[c]})" if c in FILE_NAME_OF else c for c in missing]
        raise DataError(f"{path} lacks the column(s) {', '.join(named)}; it has {', '.join(map(str, df.columns))}")
    df["query"] = df["query"].astype(str)
    df["ad_id"] = df["ad_id"].astype(str)
    df["title"] = df["title"].fillna("").astype(str)
    df["text"] = df["text"].fillna("").astype(str) if "text" in df.columns else ""
    if "grade" in df.columns:
        if df["grade"].isna().any() or not df["grade"].isin([0, 1, 2]).all():
            raise DataError(f"{path}: 'grade' must be 0, 1 or 2 in every row")
        df["grade"] = df["grade"].astype(int)
    return df
