"""Feast definitions of broadfast: entities, sources, feature views and feature services.

Found by ``feast -c <this folder> apply`` (and ``broadfast features apply``) as module-level
objects. Two entities — ``ad`` (join key ``ad_id``) and ``query`` (join key ``query``, the
normalised query text, :func:`broadfast.core.events.normalize_query`).

* ``ad_attributes`` — a batch feature view of ad attributes built from the relevance data set
  by ``broadfast features apply`` (``$FEAST_DATA_DIR/ad_attributes.parquet``), loaded into the
  online store by ``broadfast features materialize``. Only attributes a frontend knows at
  request time are kept; the data set's grades never become features.
* ``ad_stream_counters`` / ``query_stream_counters`` — written by the stream worker through the
  push sources ``ad_counters_push`` / ``query_counters_push`` (online only): counts of the
  current tumbling window (``stream_counter_window_s``) and its start time.
* Feature services are versioned by name (``serving_v1``): a published service is never
  changed; a new feature set is a new ``serving_vN`` and serving moves to it explicitly.

The offline files live outside the source tree, in ``$FEAST_DATA_DIR`` (their absolute paths
are stored in the registry at apply time); the names come from :mod:`broadfast.features.definitions`.
"""

from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Float64, Int64

from broadfast.features import definitions as names
from broadfast.features.config import ENV_DATA_DIR, require_env

DATA_DIR = Path(require_env(ENV_DATA_DIR))

# -- entities -----------------------------------------------------------------------------------
ad = Entity(name="ad", join_keys=["ad_id"], value_type=ValueType.STRING, description="An ad (a product of the data set).")
query = Entity(name="query", join_keys=["query"], value_type=ValueType.STRING, description="A normalised search query.")

# -- batch: ad attributes from the data set -------------------------------------------------------
ad_attributes_source = FileSource(
    name="ad_attributes_source",
    path=str(DATA_DIR / names.AD_ATTRIBUTES_FILE),
    timestamp_field="event_timestamp",
    description="Built from the relevance data set by `broadfast features apply`.",
)
ad_attributes = FeatureView(
    name=names.AD_ATTRIBUTES_VIEW,
    entities=[ad],
    ttl=timedelta(days=3650),  # static attributes: never stale
    schema=[Field(name=name, dtype=Int64) for name in names.AD_ATTRIBUTE_FEATURES],
    source=ad_attributes_source,
    online=True,
    tags={"owner": "features", "source": "dataset"},
)


# -- stream: counters pushed by `broadfast stream` ------------------------------------------------
def _push_source(push_name: str, file_name: str) -> PushSource:
    offline = FileSource(
        name=f"{push_name}_batch",
        path=str(DATA_DIR / file_name),
        timestamp_field="event_timestamp",
        description="Offline twin of the push source (the stream pushes online only).",
    )
    return PushSource(name=push_name, batch_source=offline)


def _counters_view(kind: str, entity: Entity, source: PushSource) -> FeatureView:
    return FeatureView(
        name=names.counters_view(kind),
        entities=[entity],
        ttl=timedelta(days=2),
        schema=[Field(name=n, dtype=Float64 if n.endswith("_ctr") else Int64) for n in names.counter_features(kind)],
        source=source,
        online=True,
        tags={"owner": "stream", "window": "tumbling"},
    )


ad_counters_push = _push_source(names.AD_PUSH, names.AD_COUNTERS_FILE)
query_counters_push = _push_source(names.QUERY_PUSH, names.QUERY_COUNTERS_FILE)
ad_stream_counters = _counters_view("ad", ad, ad_counters_push)
query_stream_counters = _counters_view("query", query, query_counters_push)

# -- services (versioned by name; never edited once published) -------------------------------------
serving_v1 = FeatureService(
    name=names.SERVING_SERVICE,
    features=[ad_attributes, ad_stream_counters, query_stream_counters],
    tags={"version": "1", "consumer": "serving"},
    description="What the scoring API reads per request: ad attributes and ad/query stream counters.",
)
