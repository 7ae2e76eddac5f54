"""The Feast feature store of broadfast: configuration from settings, apply, materialize,
pushes from the stream and the one batched online read serving does per request.

``features/feature_store.yaml`` is the one configuration; its ``${VAR}`` placeholders are
filled from the settings (:func:`feast_env`): the Redis online store from
``BROADFAST_REDIS_URL``, the file registry and offline files under ``BROADFAST_FEAST_DATA``
(default ``<home>/feast``), the project from ``BROADFAST_FEAST_PROJECT``.

>>> redis_connection_string("redis://127.0.0.1:6390/2")
'127.0.0.1:6390,db=2'
>>> redis_connection_string("rediss://:s3cret@cache:6380/0")
'cache:6380,db=0,password=s3cret,ssl=true'
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from broadfast.errors import ConfigError, DataError
from broadfast.settings import Settings
from features import definitions as defs
from features.errors import FeatureStoreError

log = logging.getLogger(__name__)

PACKAGE_REPO = Path(__file__).resolve().parent
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


# -- configuration ------------------------------------------------------------------------
def repo_path(settings: Settings) -> Path:
    return (settings.feast_repo or PACKAGE_REPO).expanduser()


def data_path(settings: Settings) -> Path:
    """Registry and offline files (never inside the source tree)."""
    return (settings.feast_data or settings.home / "feast").expanduser()


def redis_connection_string(url: str) -> str:
    """Feast's ``host:port,db=N[,password=…][,ssl=true]`` form of a ``redis://`` URL."""
    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "rediss") or not parsed.hostname:
        raise ConfigError(f"BROADFAST_REDIS_URL must look like redis://host:port/db, got {url!r}")
    db = (parsed.path or "/0").lstrip("/") or "0"
    if not db.isdigit():
        raise ConfigError(f"BROADFAST_REDIS_URL has a database that is not a number: {db!r}")
    parts = [f"{parsed.hostname}:{parsed.port or 6379}", f"db={db}"]
    if parsed.password:
        parts.append(f"password={unquote(parsed.password)}")
    if parsed.scheme == "rediss":
        parts.append("ssl=true")
    return ",".join(parts)


def feast_env(settings: Settings) -> dict[str, str]:
    """Values of the ``${VAR}`` placeholders in feature_store.yaml."""
    return {
        "FEAST_PROJECT": settings.feast_project,
        "FEAST_REGISTRY_PATH": str(data_path(settings) / "registry.db"),
        "FEAST_REDIS_CONNECTION": redis_connection_string(settings.redis_url),
    }


def render_yaml(settings: Settings) -> str:
    """feature_store.yaml with its placeholders filled (settings first, then the environment)."""
    path = repo_path(settings) / "feature_store.yaml"
    if not path.exists():
        raise ConfigError(f"no feature_store.yaml in the Feast repo {path.parent} (BROADFAST_FEAST_REPO)")
    values = feast_env(settings)

    def fill(m: re.Match[str]) -> str:
        name = m.group(1)
        if name in values:
            return values[name]
        if name in os.environ:
            return os.environ[name]
        raise ConfigError(f"{path}: ${{{name}}} is neither rendered from settings nor set in the environment")

    return _VAR.sub(fill, path.read_text())


def repo_config(settings: Settings) -> Any:
    """Feast's RepoConfig for these settings."""
    import yaml
    from feast.repo_config import RepoConfig

    config = RepoConfig(**yaml.safe_load(render_yaml(settings)))
    config.repo_path = repo_path(settings)
    return config


def feature_store(settings: Settings) -> Any:
    """A FeatureStore on the rendered configuration."""
    from feast import FeatureStore

    data_path(settings).mkdir(parents=True, exist_ok=True)
    return FeatureStore(repo_path=str(repo_path(settings)), config=repo_config(settings))


# -- apply / materialize --------------------------------------------------------------------
def build_ad_attributes(data: Path, out: Path, ts: datetime | None = None) -> int:
    """Ad attributes from a relevance data set (one row per ad) into a parquet file."""
    import pandas as pd

    from streams.datasets import load_pairs

    df = load_pairs(data)
    if df.empty:
        raise DataError(f"{data} holds no pairs")
    first = df.groupby("product_id", sort=True).agg(title=("title", "first"), description=("description", "first"), queries=("query", "nunique"))
    table = pd.DataFrame(
        {
            "ad_id": first.index.astype(str),
            "ad_title_chars": first["title"].str.len().astype("int64").to_numpy(),
            "ad_title_words": first["title"].str.split().str.len().fillna(0).astype("int64").to_numpy(),
            "ad_description_chars": first["description"].str.len().astype("int64").to_numpy(),
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


def apply(settings: Settings, data: Path | None = None) -> dict[str, Any]:
    """Build the ad attributes from the data set and register every definition."""
    out_dir = data_path(settings)
    n_ads = build_ad_attributes(data or settings.data, out_dir / defs.AD_ATTRIBUTES_FILE)
    _empty_counters("ad", out_dir / defs.AD_COUNTERS_FILE)
    _empty_counters("query", out_dir / defs.QUERY_COUNTERS_FILE)
    store = feature_store(settings)
    objects = defs.definitions(out_dir)
    store.apply(objects)
    log.info("applied %d Feast objects to project %s (%d ads from %s)", len(objects), settings.feast_project, n_ads, data or settings.data)
    return {"objects": len(objects), "ads": n_ads, "registry": feast_env(settings)["FEAST_REGISTRY_PATH"]}


def materialize(settings: Settings, end: datetime | None = None) -> dict[str, Any]:
    """Load the batch features (ad attributes) into the Redis online store."""
    store = feature_store(settings)
    end = end or datetime.now(UTC) + timedelta(seconds=1)
    t0 = time.perf_counter()
    try:
        store.materialize(start_date=datetime(2000, 1, 1, tzinfo=UTC), end_date=end, feature_views=["ad_attributes"])
    except Exception as exc:
        if "not found" in str(exc).lower() or "FeatureViewNotFound" in type(exc).__name__:
            raise FeatureStoreError("the feature repo is not applied yet: run `broadfast features apply` first") from exc
        raise
    return {"feature_views": ["ad_attributes"], "seconds": round(time.perf_counter() - t0, 3)}


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
            store.write_to_online_store(f"{kind}_stream_counters", frame)
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
        from streams.events import normalize_query

        if not ad_ids:
            return []
        q = normalize_query(query)
        rows = [{"ad_id": a, "query": q} for a in ad_ids]
        data = self.store.get_online_features(features=self.service, entity_rows=rows).to_dict()
        return [{n: float(data[n][i]) if data[n][i] is not None else 0.0 for n in self.names} for i in range(len(ad_ids))]
