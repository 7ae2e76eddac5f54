"""The Feast feature store of broadfast: apply, materialize, pushes from the stream and the one
batched online read serving does per request.

The repo is the plain Feast repo ``broadfast/features/feature_repo/`` (or ``BROADFAST_FEAST_REPO``);
:mod:`broadfast.features.config` finds it and sets the variables its feature_store.yaml and
definitions read, so the library and ``feast -c <repo> …`` see the same store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from broadfast.core.errors import DataError
from broadfast.core.settings import Settings
from broadfast.features import definitions as defs
from broadfast.features.config import (  # noqa: F401 - re-exported: the stream and the tests import them from here
    PACKAGE_REPO,
    data_path,
    feast_env,
    feature_store,
    redis_connection_string,
    repo_config,
    repo_objects,
    repo_path,
)
from broadfast.features.errors import FeatureStoreError

log = logging.getLogger(__name__)


# -- apply / materialize --------------------------------------------------------------------
def build_ad_attributes(data: Path, out: Path, ts: datetime | None = None) -> int:
    """Ad attributes from a relevance data set (one row per ad) into a parquet file."""
    import pandas as pd

    from broadfast.core.datasets import load_pairs

    df = load_pairs(data)
    if df.empty:
        raise DataError(f"{data} holds no pairs")
    # load_pairs speaks the project's vocabulary: ad_id, title, text (the files' description)
    first = df.groupby("ad_id", sort=True).agg(title=("title", "first"), text=("text", "first"), queries=("query", "nunique"))
    table = pd.DataFrame(
        {
            "ad_id": first.index.astype(str),
            "ad_title_chars": first["title"].str.len().astype("int64").to_numpy(),
            "ad_title_words": first["title"].str.split().str.len().fillna(0).astype("int64").to_numpy(),
            "ad_description_chars": first["text"].str.len().astype("int64").to_numpy(),
            "ad_dataset_queries": first["queries"].astype("int64").to_numpy(),
            "event_timestamp": pd.Timestamp(ts or datetime.now(UTC)),
        }
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out, index=False)
    return len(table)


def _empty_counters(kind: str, out: Path) -> None:
    import pandas as pd

    if out.exists():
        return
    cols: dict[str, Any] = {("ad_id" if kind == "ad" else "query"): pd.Series(dtype="string")}
    for name in defs.counter_features(kind):
        cols[name] = pd.Series(dtype="float64" if name.endswith("_ctr") else "int64")
    cols["event_timestamp"] = pd.Series(dtype="datetime64[ns, UTC]")
    pd.DataFrame(cols).to_parquet(out, index=False)


def write_offline_files(settings: Settings, data: Path | None = None) -> int:
    """The repo's offline files in ``<feast_data>``: ad attributes from the data set, empty counters; returns the ads."""
    out_dir = data_path(settings)
    n_ads = build_ad_attributes(data or settings.data, out_dir / defs.AD_ATTRIBUTES_FILE)
    _empty_counters("ad", out_dir / defs.AD_COUNTERS_FILE)
    _empty_counters("query", out_dir / defs.QUERY_COUNTERS_FILE)
    return n_ads


def apply(settings: Settings, data: Path | None = None, *, register: bool = True) -> dict[str, Any]:
    """Build the offline files from the data set and register every definition of the repo.

    ``register=False`` stops after the files, for a plain ``feast -c <repo> apply`` to register.
    """
    n_ads = write_offline_files(settings, data)
    summary: dict[str, Any] = {"ads": n_ads, "data": str(data_path(settings)), "repo": str(repo_path(settings))}
    if register:
        store = feature_store(settings)
        objects = repo_objects(settings)
        store.apply(objects)
        summary |= {"objects": len(objects), "registry": str(store.config.registry.path)}
        log.info("applied %d Feast objects to project %s (%d ads from %s)", len(objects), settings.features.feast_project, n_ads, data or settings.data)
    return summary


def materialize(settings: Settings, end: datetime | None = None) -> dict[str, Any]:
    """Load the batch features (ad attributes) into the Redis online store."""
    store = feature_store(settings)
    end = end or datetime.now(UTC) + timedelta(seconds=1)
    t0 = time.perf_counter()
    try:
        store.materialize(start_date=datetime(2000, 1, 1, tzinfo=UTC), end_date=end, feature_views=[defs.AD_ATTRIBUTES_VIEW])
    except Exception as exc:
        if "not found" in str(exc).lower() or "FeatureViewNotFound" in type(exc).__name__:
            raise FeatureStoreError("the feature repo is not applied yet: run `broadfast features apply` first") from exc
        raise
    return {"feature_views": [defs.AD_ATTRIBUTES_VIEW], "seconds": round(time.perf_counter() - t0, 3)}


# -- stream side: pushes -------------------------------------------------------------------
def counter_frames(values: Mapping[tuple[str, str], Any], windows: Mapping[tuple[str, str], int], ts: datetime | None = None) -> dict[str, Any]:
    """Push-source data frames (``ad`` and ``query``) from counter values."""
    import pandas as pd

    ts = ts or datetime.now(UTC)
    rows: dict[str, list[dict[str, Any]]] = {"ad": [], "query": []}
    for (kind, ent), v in values.items():
        rows[kind].append(
            {
                ("ad_id" if kind == "ad" else "query"): ent,
                f"{kind}_scored": int(v.scored),
                f"{kind}_impressions": int(v.impressions),
                f"{kind}_clicks": int(v.clicks),
                f"{kind}_ctr": float(v.ctr),
                f"{kind}_window_start": int(windows[(kind, ent)]),
                "event_timestamp": ts,
            }
        )
    return {kind: pd.DataFrame(r) for kind, r in rows.items() if r}


def push_counters(store: Any, values: Mapping[tuple[str, str], Any], windows: Mapping[tuple[str, str], int], *, via_push_source: bool = False) -> int:
    """Write counter values to the online store; returns rows written.

    ``FeatureStore.push(push_source, df)`` looks every feature view of the push source up in
    the registry and lists every feature service (for ``precompute_online``) on each call; the
    stream knows its one view per push source, so by default it calls
    ``FeatureStore.write_to_online_store(view, df)`` — the step ``push`` ends in — directly.
    """
    from feast.data_source import PushMode

    frames = counter_frames(values, windows)
    for kind, frame in frames.items():
        if via_push_source:
            store.push(defs.AD_PUSH if kind == "ad" else defs.QUERY_PUSH, frame, to=PushMode.ONLINE)
        else:
            store.write_to_online_store(defs.counters_view(kind), frame)
    return sum(len(f) for f in frames.values())


# -- serving side: one batched read per request ---------------------------------------------------
class OnlineFeatures:
    """The serving read: ad and query features of one request in one Feast call.

    >>> # reader = OnlineFeatures(settings); reader.read("cordless drill", ["a1", "a2"])
    >>> # -> [{"ad_title_chars": 31.0, ..., "query_ctr": 0.12}, {...}]   (one dict per ad)

    Missing values (an ad never seen by the stream, not materialized) read as 0.0.
    """

    def __init__(self, settings: Settings, service: str = defs.SERVING_SERVICE, store: Any | None = None) -> None:
        self.store = store if store is not None else feature_store(settings)
        try:
            self.service = self.store.get_feature_service(service)
        except Exception as exc:
            raise FeatureStoreError(f"feature service {service!r} is not registered: run `broadfast features apply`") from exc
        self.names = [f.name for proj in self.service.feature_view_projections for f in proj.features]

    def read(self, query: str, ad_ids: Sequence[str]) -> list[dict[str, float]]:
        from broadfast.core.events import normalize_query

        if not ad_ids:
            return []
        q = normalize_query(query)
        rows = [{"ad_id": a, "query": q} for a in ad_ids]
        data = self.store.get_online_features(features=self.service, entity_rows=rows).to_dict()
        return [{n: float(data[n][i]) if data[n][i] is not None else 0.0 for n in self.names} for i in range(len(ad_ids))]
