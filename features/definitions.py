"""Feast definitions of broadfast: entities, feature views, push sources, feature services.

Two entities — ``ad`` (join key ``ad_id``) and ``query`` (join key ``query``, the
normalised query text, :func:`streams.events.normalize_query`).

* ``ad_attributes`` — a batch feature view of ad attributes built from the relevance data
  set by ``broadfast features apply`` (a parquet file in ``<feast_data>``), loaded into the
  online store by ``broadfast features materialize``. Only attributes a frontend knows
  at request time are kept; the data set's grades never become features.
* ``ad_stream_counters`` / ``query_stream_counters`` — written by the stream worker through
  the push sources ``ad_counters_push`` / ``query_counters_push`` (online only): counts of the
  current tumbling window (``stream_counter_window_s``) and its start time.
* Feature services are versioned by name (``serving_v1``): a published service is never
  changed; a new feature set is a new ``serving_vN`` and serving moves to it explicitly.

The paths of the file sources depend on settings, so the objects are built by
:func:`definitions` rather than at import time.

>>> from pathlib import Path
>>> [o.name for o in definitions(Path("/tmp/feast"))][-3:]
['ad_stream_counters', 'query_stream_counters', 'serving_v1']
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

AD_ATTRIBUTES_FILE = "ad_attributes.parquet"
AD_COUNTERS_FILE = "ad_counters.parquet"
QUERY_COUNTERS_FILE = "query_counters.parquet"

AD_PUSH = "ad_counters_push"
QUERY_PUSH = "query_counters_push"
SERVING_SERVICE = "serving_v1"

# Feature names (unique across views, so one service can read them without prefixes).
AD_ATTRIBUTE_FEATURES = ("ad_title_chars", "ad_title_words", "ad_description_chars", "ad_dataset_queries")
COUNTER_FIELDS = ("scored", "impressions", "clicks", "ctr", "window_start")


def counter_features(kind: str) -> tuple[str, ...]:
    """Feature names of the stream counters of ``kind`` ('ad' or 'query')."""
    return tuple(f"{kind}_{name}" for name in COUNTER_FIELDS)


def definitions(data_dir: Path) -> list[Any]:
    """Every Feast object of the repo, with its file sources under ``data_dir``."""
    from feast import (
        Entity,
        FeatureService,
        FeatureView,
        Field,
        FileSource,
        PushSource,
        ValueType,
    )
    from feast.types import Float64, Int64

    # -- entities -------------------------------------------------------------------------
    ad = Entity(name="ad", join_keys=["ad_id"], value_type=ValueType.STRING, description="An ad (a product of the data set).")
    query = Entity(name="query", join_keys=["query"], value_type=ValueType.STRING, description="A normalised search query.")

    # -- batch: ad attributes from the data set -----------------------------------------------
    ad_source = FileSource(
        name="ad_attributes_source",
        path=str(data_dir / AD_ATTRIBUTES_FILE),
        timestamp_field="event_timestamp",
        description="Built from the relevance data set by `broadfast features apply`.",
    )
    ad_attributes = FeatureView(
        name="ad_attributes",
        entities=[ad],
        ttl=timedelta(days=3650),  # static attributes: never stale
        schema=[Field(name=name, dtype=Int64) for name in AD_ATTRIBUTE_FEATURES],
        source=ad_source,
        online=True,
        tags={"owner": "features", "source": "dataset"},
    )

    # -- stream: counters pushed by `broadfast stream` -----------------------------------------
    def counters_view(kind: str, entity: Any, push_name: str, file_name: str) -> FeatureView:
        push = PushSource(
            name=push_name,
            batch_source=FileSource(
                name=f"{push_name}_batch",
                path=str(data_dir / file_name),
                timestamp_field="event_timestamp",
                description="Offline twin of the push source (the stream pushes online only).",
            ),
        )
        names = counter_features(kind)
        return FeatureView(
            name=f"{kind}_stream_counters",
            entities=[entity],
            ttl=timedelta(days=2),
            schema=[Field(name=n, dtype=Float64 if n.endswith("_ctr") else Int64) for n in names],
            source=push,
            online=True,
            tags={"owner": "stream", "window": "tumbling"},
        )

    ad_counters = counters_view("ad", ad, AD_PUSH, AD_COUNTERS_FILE)
    query_counters = counters_view("query", query, QUERY_PUSH, QUERY_COUNTERS_FILE)

    # -- services (versioned by name; never edited once published) ----------------------------
    serving_v1 = FeatureService(
        name=SERVING_SERVICE,
        features=[ad_attributes, ad_counters, query_counters],
        tags={"version": "1", "consumer": "serving"},
        description="What the scoring API reads per request: ad attributes and ad/query stream counters.",
    )
    return [ad, query, ad_source, ad_attributes, ad_counters, query_counters, serving_v1]
