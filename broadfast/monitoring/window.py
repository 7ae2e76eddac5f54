"""Monitoring windows: what a drift report compares, built from files or from traffic.

A *window* is a DataFrame with one row per scored query–ad pair and these columns
(only ``query`` and ``title`` are required):

==================  ==================================================================
``query``, ``title`` the search text and the ad title
``score``           the student's score (P(exact) + ½·P(partial))
``p_irrelevant``…   the student's grade probabilities (``p_partial``, ``p_exact``)
``label``           a reference grade where one exists (teacher label on traffic, the
                    human ``grade`` in a file of pairs), else missing
``hard_case``       1 when the stream sent the pair to the teacher, 0 otherwise
``f_<name>``        stream counters carried on ``Scored.features``
``request_id``…     ids, arm, latency: kept for the A/B comparison, ignored by drift
==================  ==================================================================

:func:`drift_frame` turns a window into the columns the drift report tests, on a seeded
sample of at most ``sample_rows`` rows. Each column has a *role*: ``input`` columns describe
the traffic (compared with the traffic's reference window), ``model`` columns what the serving
version did with it (compared with that version's own reference, so a model swap is not
reported as data drift; see :mod:`broadfast.monitoring.monitor`).

The query frequency is a query's share of a block of ``freq_rows`` consecutive rows, not of
the whole window: a share counted inside a window changes with the window's length even when
the traffic does not (a small first window makes every query "head"), while the share in a
block of a fixed size is a property of the traffic alone. :mod:`broadfast.monitoring.drift` counts both
windows in blocks of the same size. Query-level columns are kept once per request:

>>> import pandas as pd
>>> w = pd.DataFrame({"query": ["drill", "drill", "red paint"], "title": ["cordless drill", "saw", "paint red"]})
>>> f = drift_frame(w, sample_rows=10)
>>> f[["title_tokens", "token_overlap"]].values.tolist(), f["query_tokens"].tolist()
([[2.0, 1.0], [1.0, 0.0], [2.0, 1.0]], [1.0, nan, 2.0])
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from broadfast.monitoring.errors import WindowError
from broadfast.core.events import GRADES, pair_id

PROB_COLUMNS = tuple(f"p_{g}" for g in GRADES)  # p_irrelevant, p_partial, p_exact
_TOKEN = re.compile(r"[a-z0-9]+")

# Query frequency buckets by the query's share of a sample of FREQ_ROWS rows of the window.
FREQ_BUCKETS = ((0.01, "head"), (0.001, "torso"), (0.0, "tail"))
FREQ_ROWS = 2000  # at most; both windows of a report are counted in blocks of one size


@dataclass(frozen=True)
class Column:
    """One tested column of the drift report."""

    name: str
    kind: str  # "num" or "cat"
    what: str
    role: str = "input"  # "input": the traffic; "model": what the serving version did with it


COLUMNS: tuple[Column, ...] = (
    Column("query_tokens", "num", "query length in tokens"),
    Column("title_tokens", "num", "ad title length in tokens"),
    Column("token_overlap", "num", "share of the query's tokens found in the ad title"),
    Column("query_freq", "cat", f"query frequency bucket (head / torso / tail by share of a {FREQ_ROWS:,}-row sample of the window)"),
    Column("score", "num", "student score (prediction drift)", "model"),
    Column("pred_grade", "cat", "student's predicted grade (argmax of its probabilities)", "model"),
    Column("label_agreement", "num", "1 when the student's grade equals the teacher's or human label", "model"),
    Column("hard_case", "num", "1 when the pair was sent to the teacher as a hard case", "model"),
)
MODEL_COLUMNS = tuple(c.name for c in COLUMNS if c.role == "model")  # stream counters (f_*) are inputs


def tokens(text: str) -> list[str]:
    """Lower-case alphanumeric tokens.

    >>> tokens("DeWalt 20V-Max drill")
    ['dewalt', '20v', 'max', 'drill']
    """
    return _TOKEN.findall(text.lower())


def window_from_pairs(df: pd.DataFrame) -> pd.DataFrame:
    """A window from a parquet-style frame of pairs (``load_pairs`` columns, maybe scored).

    Uses ``score`` / ``p_*`` when present (the ``predict`` output), ``grade`` as the label,
    and ``hard_case`` when present.
    """
    missing = [c for c in ("query", "title") if c not in df.columns]
    if missing:
        raise WindowError(f"a window of pairs needs the column(s) {', '.join(missing)}")
    # in request order: each query's pairs together, as a request shows them (query frequency is counted in blocks of rows)
    df = df.iloc[np.argsort(pd.factorize(df["query"].astype(str))[0], kind="stable")]
    out = pd.DataFrame({"query": df["query"].astype(str).to_numpy(), "title": df["title"].fillna("").astype(str).to_numpy()})
    if all(c in df.columns for c in PROB_COLUMNS):
        for c in PROB_COLUMNS:
            out[c] = df[c].to_numpy(dtype=float)
        out["score"] = df["score"].to_numpy(dtype=float) if "score" in df.columns else out["p_exact"] + 0.5 * out["p_partial"]
    elif "score" in df.columns:
        out["score"] = df["score"].to_numpy(dtype=float)
    if "grade" in df.columns:
        out["label"] = pd.to_numeric(df["grade"], errors="coerce").to_numpy()
    if "hard_case" in df.columns:
        out["hard_case"] = df["hard_case"].astype(float).to_numpy()
    for c in df.columns:
        if str(c).startswith("f_"):
            out[c] = pd.to_numeric(df[c], errors="coerce").to_numpy()
    return out


def window_from_traffic(scored: pd.DataFrame, labels: pd.DataFrame | None = None, hardcases: pd.DataFrame | None = None) -> pd.DataFrame:
    """A window from frames of ``Scored`` events (+ teacher labels and hard cases).

    ``scored`` has the event fields with ``grade_probs`` split into ``p_*`` columns and
    ``features`` spread into ``f_<name>`` columns (see :mod:`broadfast.monitoring.traffic`);
    ``labels`` has ``pair_id`` and ``label`` (the teacher's grade); ``hardcases`` has ``pair_id``.
    """
    if scored.empty:
        raise WindowError("no scored traffic in the window")
    out = scored.rename(columns={"title": "title"}).copy()
    out["pair_id"] = pair_ids(out["query"], out["ad_id"])
    if labels is not None and not labels.empty:
        teacher = labels.drop_duplicates("pair_id", keep="last").set_index("pair_id")["label"]
        out["label"] = out["pair_id"].map(teacher)
    if hardcases is not None:
        out["hard_case"] = out["pair_id"].isin(set(hardcases["pair_id"])).astype(float)
    return out


def serving_version(scored: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """The version serving now (the newest champion event's) and the champion's rows, oldest first
    (all rows when no request went to a champion arm).

    >>> version, rows = serving_version(pd.DataFrame({"arm": ["champion"] * 3, "ts": [2.0, 3.0, 1.0], "model_version": ["v1", "v2", "v1"]}))
    >>> version, rows["ts"].tolist()
    ('v2', [1.0, 2.0, 3.0])
    """
    champion = scored[scored["arm"] == "champion"]
    live = (champion if len(champion) else scored).sort_values("ts", kind="stable")
    return str(live["model_version"].iloc[-1]), live


def pair_ids(queries: pd.Series, ad_ids: pd.Series) -> np.ndarray:
    """:func:`broadfast.core.events.pair_id` of each row, hashed once per distinct (query, ad) pair.

    >>> pair_ids(pd.Series(["a", "a"]), pd.Series(["x", "x"])).tolist() == [pair_id("a", "x")] * 2
    True
    """
    q_codes, q_uniques = pd.factorize(queries.astype(str))
    a_codes, a_uniques = pd.factorize(ad_ids.astype(str))
    combined = q_codes.astype(np.int64) * max(len(a_uniques), 1) + a_codes
    distinct, inverse = np.unique(combined, return_inverse=True)
    n_ads = max(len(a_uniques), 1)
    hashed = np.array([pair_id(q_uniques[c // n_ads], a_uniques[c % n_ads]) for c in distinct], dtype=object)
    return hashed[inverse]


def sample(window: pd.DataFrame, rows: int, seed: int = 0) -> pd.DataFrame:
    """At most ``rows`` rows, drawn uniformly without replacement with a fixed seed."""
    if len(window) <= rows:
        return window
    idx = np.random.default_rng(seed).choice(len(window), size=rows, replace=False)
    return window.iloc[np.sort(idx)]


def query_frequency_bucket(queries: pd.Series, block_rows: int | None = None) -> pd.Series:
    """Bucket each query by its share of the block of ``block_rows`` consecutive rows it falls in
    (all rows when None or fewer; the last block reaches back to keep its size): head ≥ 1%,
    torso ≥ 0.1%, tail below. In arrival order, every block of one size has the same
    distribution when the traffic is stationary, whatever the window's length.

    >>> query_frequency_bucket(pd.Series(["a", "a", "b", "c"]), block_rows=2).tolist()
    ['head', 'head', 'head', 'head']
    """
    codes, uniques = pd.factorize(queries)  # normalise each distinct query once
    norm_codes, _ = pd.factorize(pd.Index(uniques).str.lower().str.strip())
    per_row = norm_codes[codes]
    n = len(per_row)
    size = min(block_rows or n, n)
    share = np.zeros(n)
    for start in range(0, n, max(size, 1)):
        lo = min(start, n - size)
        counts = np.bincount(per_row[lo : lo + size], minlength=int(per_row.max()) + 1)
        share[start : start + size] = counts[per_row[start : start + size]] / size
    out = pd.Series("tail", index=queries.index, dtype=object)
    out[share >= FREQ_BUCKETS[1][0]] = FREQ_BUCKETS[1][1]
    out[share >= FREQ_BUCKETS[0][0]] = FREQ_BUCKETS[0][1]
    return out


def first_of_request(window: pd.DataFrame) -> np.ndarray:
    """True on the first row of each request (``request_id``; in a file of pairs, of each query):
    a query-level value is counted once per request, not once per ad shown with it — the ads of
    one request repeat their query's value, and tests that took them as independent would call
    noise drift."""
    key = window["request_id"] if "request_id" in window.columns else window["query"]
    return ~key.astype(str).duplicated().to_numpy()


def drift_frame(window: pd.DataFrame, *, sample_rows: int, freq_rows: int | None = FREQ_ROWS, seed: int = 0) -> pd.DataFrame:
    """The tested columns of a window (rows in arrival order), on a sample of at most
    ``sample_rows`` rows; query frequency counted in blocks of ``freq_rows`` consecutive rows of
    the whole window; the query-level columns (``query_tokens``, ``query_freq``) kept on the first
    row of each request only (missing elsewhere)."""
    if window.empty:
        raise WindowError("the window is empty")
    freq = query_frequency_bucket(window["query"].astype(str), freq_rows)
    first = pd.Series(first_of_request(window), index=window.index)
    win = sample(window, sample_rows, seed)
    q_tok = [set(tokens(q)) for q in win["query"].astype(str)]
    t_tok = [set(tokens(t)) for t in win["title"].astype(str)]
    once = first.loc[win.index].to_numpy()
    out = pd.DataFrame(index=win.index)
    out["query_tokens"] = np.where(once, np.array([len(q) for q in q_tok], dtype=float), np.nan)
    out["title_tokens"] = np.array([len(t) for t in t_tok], dtype=float)
    out["token_overlap"] = np.array([len(q & t) / len(q) if q else 0.0 for q, t in zip(q_tok, t_tok)], dtype=float)
    out["query_freq"] = freq.loc[win.index].astype(object).where(once, None)
    if "score" in win.columns:
        out["score"] = win["score"].astype(float)
    if all(c in win.columns for c in PROB_COLUMNS):
        probs = win[list(PROB_COLUMNS)].to_numpy(dtype=float)
        pred = probs.argmax(axis=1)
        out["pred_grade"] = pred.astype(str)
        if "label" in win.columns:
            label = pd.to_numeric(win["label"], errors="coerce").to_numpy()
            out["label_agreement"] = np.where(np.isnan(label), np.nan, (pred == label).astype(float))
    if "hard_case" in win.columns:
        out["hard_case"] = win["hard_case"].astype(float)
    for c in win.columns:
        if str(c).startswith("f_"):
            out[c] = pd.to_numeric(win[c], errors="coerce").astype(float)
    return out.reset_index(drop=True)


def window_stats(frame: pd.DataFrame, rows: int) -> dict[str, float | int | None]:
    """Headline figures of a drift frame: sizes, mean score, hard-case rate, label agreement."""

    def mean(col: str) -> float | None:
        if col not in frame.columns or frame[col].notna().sum() == 0:
            return None
        return round(float(frame[col].mean()), 6)

    return {
        "rows": int(rows),
        "sampled_rows": int(frame["title_tokens"].notna().sum()) if "title_tokens" in frame.columns else len(frame),
        "score_mean": mean("score"),
        "hard_case_rate": mean("hard_case"),
        "label_agreement": mean("label_agreement"),
        "labelled_rows": int(frame["label_agreement"].notna().sum()) if "label_agreement" in frame.columns else 0,
        "query_tokens_mean": mean("query_tokens"),
    }


def score_columns(probs: np.ndarray) -> dict[str, np.ndarray]:
    """``score`` and ``p_*`` columns from an (n, 3) array of grade probabilities."""
    probs = np.asarray(probs, dtype=float)
    cols = {c: probs[:, i] for i, c in enumerate(PROB_COLUMNS)}
    cols["score"] = probs[:, 2] + 0.5 * probs[:, 1]  # broadfast.core.events.score_from_probs, vectorised
    return cols
