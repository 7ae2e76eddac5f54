"""Events through the real embedded broker: round trips and dead letters."""

from __future__ import annotations

import json

import pytest

from broadfast.core.errors import EventValidationError
from broadfast.core.settings import Settings
from broadfast.core import events as ev
from broadfast.core.bus import EventBus, consume, make_consumer
from broadfast.core.deadletter import DeadLetters, truncate_payload
from tests.conftest import read_topic
from tests.core.test_events import sample_events

pytestmark = pytest.mark.integration


def test_every_event_round_trips_through_the_broker(bus_settings: Settings) -> None:
    events = sample_events()
    with EventBus(bus_settings) as bus:
        for event in events:
            bus.publish(event)
    for event in events:
        spec = ev.spec_for(event)
        records = read_topic(bus_settings, spec.name, expect=1)
        assert len(records) == 1, spec.name
        assert records[0].key == ev.encode_key(event)
        assert ev.decode(spec.name, records[0].value) == event


def test_consumer_sends_malformed_payloads_to_dead_letters_and_goes_on(bus_settings: Settings) -> None:
    good = [ev.Click(request_id=f"r{i}", ts=1.0, query="q", ad_id=f"a{i}", position=i, clicked=i % 2 == 0) for i in range(6)]
    valid = json.loads(ev.encode(good[0]))
    bad_payloads = {
        "not-json": b"{oops",
        "wrong-type": json.dumps({**valid, "clicked": "yes"}).encode(),
        "missing-field": json.dumps({k: v for k, v in valid.items() if k != "ad_id"}).encode(),
        "bad-utf8": b'{"request_id": "\xff\xfe"}',
        "5MB": json.dumps({**valid, "query": "x" * (5 * 1024 * 1024)}).encode(),
    }
    with EventBus(bus_settings) as bus:
        # one partition key for all, so order on the topic is the order sent
        for i, event in enumerate(good):
            bus.publish(event)
            if i < len(bad_payloads):
                bus.publish_raw("clicks", list(bad_payloads.values())[i], key=b"q")
        bus.flush()
        consumer = make_consumer(bus_settings, ["clicks"], group_id="test-dl")
        letters = DeadLetters(bus_settings, bus, "test-consumer")
        got = []
        for delivery in consume(bus_settings, consumer, letters, idle_polls=40, poll_timeout_ms=500):
            if delivery is not None:
                got.append(delivery.event)
                if len(got) == len(good):
                    break
        consumer.close()
        bus.flush()

    assert sorted(got, key=lambda e: e.request_id) == good  # every valid event, none lost
    assert letters.count == len(bad_payloads)
    dead = [ev.decode("deadletter", r.value) for r in read_topic(bus_settings, "deadletter", expect=len(bad_payloads))]
    assert len(dead) == len(bad_payloads)
    reasons = " | ".join(d.error for d in dead)
    for expected in ("not valid JSON", "field 'clicked'", "field 'ad_id'", "not valid UTF-8", "exceeds the limit"):
        assert expected in reasons
    for letter in dead:
        assert letter.source_topic == bus_settings.topic("clicks")
        assert letter.partition is not None and letter.offset is not None and letter.offset >= 0
        assert letter.consumer == "test-consumer"
        assert len(letter.payload.encode()) < bus_settings.kafka.deadletter_payload_bytes + 200  # truncated
    big = next(d for d in dead if "exceeds" in d.error)
    assert big.payload_bytes > 5 * 1024 * 1024 and "truncated" in big.payload


def test_truncate_payload_keeps_invalid_bytes_visible() -> None:
    text, size = truncate_payload(b"ab\xffcd" * 10, 6)
    assert size == 50 and text.startswith("ab\\xffcd") and "truncated" in text


def test_publishing_an_oversized_event_is_refused(bus_settings: Settings) -> None:
    small = bus_settings.model_copy(update={"max_event_bytes": 2048})
    req = ev.SearchRequest(request_id="r", ts=1.0, user_id="u", query="q", ads=[ev.Ad(ad_id=f"a{i}", title="t" * 100) for i in range(50)])
    with EventBus(small) as bus, pytest.raises(EventValidationError, match="exceeds the limit"):
        bus.publish(req)


def test_events_the_broker_never_acknowledged_are_counted_and_replay_reports_them(tmp_path) -> None:
    """A broker that goes away mid-run: the replay's events are counted as lost, never reported as sent."""
    from broadfast.simulation.replay import Replayer, plan_requests
    from broadfast.devstack.stack import EmbeddedStack
    from tests.simulation.test_replay import tiny_pairs

    base = Settings(home=tmp_path, topic_partitions=1, topic_prefix="lost")
    stack = EmbeddedStack(base)
    state, _ = stack.up()
    settings = base.model_copy(update={"kafka_bootstrap": state.env["BROADFAST_KAFKA_BOOTSTRAP"], "kafka_flavor": "tansu"})
    try:
        with EventBus(settings) as bus:
            bus.publish(sample_events()[0])
            bus.flush(timeout=10)
            assert (bus.sent, bus.delivered, bus.undelivered, bus.pending) == (1, 1, 0, 0)
            stack.down()  # the broker goes away; the producer already knows the topics, so sends are accepted and buffered
            stats = Replayer(bus, seed=1).run(plan_requests(tiny_pairs(), limit=3, seed=1), flush_timeout_s=3)
            assert stats.requests == 3
            assert stats.events_lost == bus.sent - 1 > 3  # 3 requests and their clicks: none acknowledged
            assert stats.events_delivered == 1
            assert "LOST" in stats.summary()
    finally:
        stack.down()
