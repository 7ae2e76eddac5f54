"""Names shared by the Feast repo (``feature_repo/broadfast_features.py``) and the library.

The Feast objects themselves are module-level definitions in
``broadfast/features/feature_repo/broadfast_features.py``, where the plain ``feast`` CLI finds
them; this module only holds the names the stream, serving and the tests refer to.

>>> counter_features("ad")[:2]
('ad_scored', 'ad_impressions')
"""

from __future__ import annotations

# Offline files under $FEAST_DATA_DIR (written by `broadfast features apply`).
AD_ATTRIBUTES_FILE = "ad_attributes.parquet"
AD_COUNTERS_FILE = "ad_counters.parquet"
QUERY_COUNTERS_FILE = "query_counters.parquet"

AD_PUSH = "ad_counters_push"
QUERY_PUSH = "query_counters_push"
AD_ATTRIBUTES_VIEW = "ad_attributes"
SERVING_SERVICE = "serving_v1"

# Feature names (unique across views, so one service can read them without prefixes).
AD_ATTRIBUTE_FEATURES = ("ad_title_chars", "ad_title_words", "ad_description_chars", "ad_dataset_queries")
COUNTER_FIELDS = ("scored", "impressions", "clicks", "ctr", "window_start")


def counter_features(kind: str) -> tuple[str, ...]:
    """Feature names of the stream counters of ``kind`` ('ad' or 'query')."""
    return tuple(f"{kind}_{name}" for name in COUNTER_FIELDS)


def counters_view(kind: str) -> str:
    """Name of the push-source feature view of ``kind`` ('ad' or 'query')."""
    return f"{kind}_stream_counters"
