"""Every client's connection config, rendered from the settings in one place, per client dialect.

The broker and Redis are reached by three client libraries: kafka-python (the bus, the serving
engine's model watcher and scored log, monitoring's traffic reader), faust (the stream worker) and
redis-py (features, budget, registry index, experiments, the stack's health checks). Each gets its
config here and nowhere else, so a workaround for a broker (``BROADFAST_KAFKA_FLAVOR``) or a size
limit is written once. Clients themselves come from :mod:`broadfast.core.bus` (Kafka) and
:func:`redis_client`.

>>> from broadfast.core.settings import Settings
>>> s = Settings(kafka_bootstrap="h1:1,h2:2", kafka_flavor="tansu", max_event_bytes=1_000_000)
>>> kafka_consumer(s, "g")["session_timeout_ms"], faust_config(s)["broker_session_timeout"]
(6000, 6.0)
>>> kafka_producer(s)["max_request_size"] == faust_config(s)["producer_max_request_size"] == batch_bytes(s)
True
>>> faust_config(s)["broker"]
'kafka://h1:1;h2:2'
"""

from __future__ import annotations

from typing import Any

from broadfast.core.settings import Settings

# The embedded broker (Tansu) rebalances fast with short sessions (measured; docs/stream.md).
TANSU_SESSION_TIMEOUT_S = 6.0
TANSU_HEARTBEAT_INTERVAL_S = 2.0
# Room for a batch of the largest accepted events: a request or a fetch holds several.
EVENTS_PER_BATCH = 6
MIN_BATCH_BYTES = 1_048_576


def batch_bytes(settings: Settings) -> int:
    """Largest produce request or partition fetch (bytes): a few events of the largest accepted size."""
    return max(settings.kafka.max_event_bytes * EVENTS_PER_BATCH, MIN_BATCH_BYTES)


def stream_group(settings: Settings, name: str) -> str:
    """A consumer group name in this deployment's namespace: ``<prefix>.<name>``."""
    return f"{settings.kafka.topic_prefix}.{name}"


# -- kafka-python ------------------------------------------------------------------------------
def kafka_common(settings: Settings) -> dict[str, Any]:
    return {"bootstrap_servers": settings.kafka.kafka_bootstrap.split(",")}


def kafka_producer(settings: Settings, **overrides: Any) -> dict[str, Any]:
    return kafka_common(settings) | {"acks": 1, "linger_ms": 5, "max_request_size": batch_bytes(settings)} | overrides


def kafka_consumer(settings: Settings, group_id: str | None, **overrides: Any) -> dict[str, Any]:
    cfg = kafka_common(settings) | {
        "group_id": group_id,
        "auto_offset_reset": "earliest",
        "enable_auto_commit": False,
        "fetch_max_bytes": max(batch_bytes(settings), 52_428_800),
        "max_partition_fetch_bytes": batch_bytes(settings),
    }
    if settings.kafka.kafka_flavor == "tansu":
        cfg |= {"session_timeout_ms": int(TANSU_SESSION_TIMEOUT_S * 1000), "heartbeat_interval_ms": int(TANSU_HEARTBEAT_INTERVAL_S * 1000)}
    return cfg | overrides


def kafka_admin(settings: Settings, **overrides: Any) -> dict[str, Any]:
    return kafka_common(settings) | overrides


# -- faust -------------------------------------------------------------------------------------
def faust_config(settings: Settings, app_id: str | None = None) -> dict[str, Any]:
    """faust ``App`` settings (the stream worker's), the faust twin of :func:`kafka_consumer`."""
    app_id = app_id or stream_group(settings, "stream")
    cfg: dict[str, Any] = {
        "id": app_id,
        "broker": "kafka://" + ";".join(settings.kafka.kafka_bootstrap.split(",")),
        # Tansu has no transactions, and Kafka needs none here: counters are exactly once
        # through Redis high-water marks, hard cases are at least once.
        "processing_guarantee": "at_least_once",
        "consumer_auto_offset_reset": "earliest",
        "topic_partitions": settings.kafka.topic_partitions,
        "topic_replication_factor": 1,
        "broker_commit_interval": 1.0,
        "consumer_max_fetch_size": batch_bytes(settings),
        "producer_max_request_size": batch_bytes(settings),
        "store": "memory://",  # no faust Tables (see broadfast.stream.app)
        "datadir": str(settings.home / "stream" / app_id),
        "web_enabled": settings.stream.stream_web_port != 0,
        "web_bind": settings.stream.stream_web_host,
        "web_host": settings.stream.stream_web_host,
        "web_port": settings.stream.stream_web_port or 6066,
    }
    if settings.kafka.kafka_flavor == "tansu":
        # Tansu's ListOffsets(latest) is off by a batch, which breaks changelog recovery unless
        # each produce request carries one record (measured, design map).
        cfg |= {"broker_session_timeout": TANSU_SESSION_TIMEOUT_S, "broker_heartbeat_interval": TANSU_HEARTBEAT_INTERVAL_S, "producer_max_batch_size": 1}
    return cfg


# -- redis-py ----------------------------------------------------------------------------------
def redis_client(settings: Settings, *, timeout_s: float | None = None) -> Any:
    """A redis-py client for ``BROADFAST_REDIS_URL`` (``timeout_s`` bounds connecting and each call)."""
    import redis

    if timeout_s is None:
        return redis.Redis.from_url(settings.redis.redis_url)
    return redis.Redis.from_url(settings.redis.redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
