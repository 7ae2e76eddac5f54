"""Client configs: one rendering per client dialect, workarounds switched by the broker flavor only."""

from __future__ import annotations

from broadfast.core import connections as c
from broadfast.core.settings import Settings


def test_broker_workarounds_only_by_flavor() -> None:
    kafka = c.kafka_consumer(Settings(kafka_flavor="kafka"), "g")
    tansu = c.kafka_consumer(Settings(kafka_flavor="tansu"), "g")
    assert "session_timeout_ms" not in kafka  # Kafka's own defaults
    assert tansu["session_timeout_ms"] == 6000 and tansu["heartbeat_interval_ms"] == 2000
    assert kafka["enable_auto_commit"] is False and tansu["group_id"] == "g"
    assert "broker_session_timeout" not in c.faust_config(Settings(kafka_flavor="kafka"))


def test_kafka_python_and_faust_agree_on_sessions_and_sizes() -> None:
    s = Settings(kafka_bootstrap="a:1,b:2", kafka_flavor="tansu", max_event_bytes=2_000_000)
    consumer, producer, faust = c.kafka_consumer(s, None), c.kafka_producer(s), c.faust_config(s)
    assert faust["broker_session_timeout"] * 1000 == consumer["session_timeout_ms"]
    assert faust["broker_heartbeat_interval"] * 1000 == consumer["heartbeat_interval_ms"]
    assert producer["max_request_size"] == faust["producer_max_request_size"] == consumer["max_partition_fetch_bytes"] == 12_000_000
    assert consumer["bootstrap_servers"] == ["a:1", "b:2"] and faust["broker"] == "kafka://a:1;b:2"
    # small events still leave room for a full request
    assert c.batch_bytes(Settings(max_event_bytes=1024)) == c.MIN_BATCH_BYTES


def test_overrides_win_over_the_rendered_config() -> None:
    s = Settings()
    assert c.kafka_consumer(s, "g", auto_offset_reset="latest")["auto_offset_reset"] == "latest"
    assert c.kafka_producer(s, max_block_ms=5)["max_block_ms"] == 5


def test_groups_live_in_the_deployment_namespace() -> None:
    assert c.stream_group(Settings(topic_prefix="ads"), "stream") == "ads.stream"
    assert c.faust_config(Settings(topic_prefix="ads"))["id"] == "ads.stream"
