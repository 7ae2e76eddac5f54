"""Hostile events through the real broker: each is dead-lettered once, with its reason.

The corpus is ``tests/hostile/events.jsonl``, one case a line: ``name`` (unique), ``topic``
(short name), ``payload`` (the raw message text), ``reason`` (a substring the dead letter's
error must contain). Raw bytes that are not UTF-8 are in ``payload_b64`` (``payload`` null);
``payload`` null without ``payload_b64`` is a null (tombstone) message. ``pad_over_limit``:
the payload, valid but for its size, is padded with spaces to one byte over
``KafkaSettings.max_event_bytes`` here rather than stored huge in the file.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path

import pytest

from broadfast.core.settings import Settings
from broadfast.core import events as ev
from broadfast.core.bus import EventBus, consume, make_consumer
from broadfast.core.deadletter import DeadLetters, truncate_payload
from tests.conftest import read_topic
from tests.core.test_events import sample_events

pytestmark = pytest.mark.integration

CORPUS = Path(__file__).resolve().parents[1] / "hostile" / "events.jsonl"
CONSUMER = "hostile-test"
VALID_EVERY = 5  # one valid event of the topic after every five bad ones


def load_corpus(max_bytes: int) -> list[dict]:
    cases = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    for case in cases:
        if case.get("payload_b64") is not None:
            case["raw"] = base64.b64decode(case["payload_b64"])
        else:
            case["raw"] = None if case["payload"] is None else case["payload"].encode("utf-8")
        if case.get("pad_over_limit"):
            case["raw"] += b" " * (max_bytes + 1 - len(case["raw"]))
    return cases


def test_every_hostile_event_is_dead_lettered_once_and_valid_ones_pass(bus_settings: Settings) -> None:
    cases = load_corpus(bus_settings.kafka.max_event_bytes)
    assert len(cases) >= 50, f"the corpus has only {len(cases)} cases"
    dupes = [n for n, k in Counter(c["name"] for c in cases).items() if k > 1]
    assert not dupes, f"case names used twice: {dupes}"
    assert {c["topic"] for c in cases} == set(ev.TOPICS)
    valid_of = {ev.spec_for(e).name: e for e in sample_events()}

    bad: dict[tuple[str, int, int], dict] = {}  # (full topic, partition, offset) -> case
    good: dict[tuple[str, int, int], ev.Event] = {}
    with EventBus(bus_settings) as bus:
        for topic in ev.TOPICS:
            mine = [c for c in cases if c["topic"] == topic]
            for i, case in enumerate(mine, 1):
                meta = bus.publish_raw(topic, case["raw"], key=case["name"].encode()).get(timeout=10)
                bad[(meta.topic, meta.partition, meta.offset)] = case
                if i % VALID_EVERY == 0 or i == len(mine):
                    meta = bus.publish(valid_of[topic]).get(timeout=10)
                    good[(meta.topic, meta.partition, meta.offset)] = valid_of[topic]
        bus.flush()

        consumer = make_consumer(bus_settings, list(ev.TOPICS), group_id=f"{bus_settings.kafka.topic_prefix}-hostile")
        letters = DeadLetters(bus_settings, bus, CONSUMER)
        delivered: dict[tuple[str, int, int], ev.Event] = {}
        quiet = 0
        try:
            for d in consume(bus_settings, consumer, letters, idle_polls=60, poll_timeout_ms=500):
                if d is not None:
                    delivered[(d.topic, d.partition, d.offset)] = d.event
                elif good.keys() <= delivered.keys() and letters.count >= len(bad):
                    quiet += 1  # everything is in: a few quiet polls more, to catch a second pass
                    if quiet >= 3:
                        break
        finally:
            consumer.close()
        bus.flush()

    missing = [(k, type(e).__name__) for k, e in good.items() if k not in delivered]
    assert not missing, f"valid events not delivered: {missing}"
    for key, event in good.items():
        assert delivered[key] == event, f"valid event at {key} changed on the way"
    wrongly = [bad[k]["name"] for k in delivered if k in bad]
    assert not wrongly, f"hostile cases delivered as valid events: {wrongly}"

    # the deadletter topic: the hostile payloads sent to it, its valid events, and the letters
    sent_there = sum(1 for k in {**bad, **good} if k[0] == bus_settings.topic("deadletter"))
    records = read_topic(bus_settings, "deadletter", expect=sent_there + len(bad), timeout_s=30)
    found: dict[tuple[str, int, int], list[ev.DeadLetter]] = {}
    for record in records:
        if (record.topic, record.partition, record.offset) in bad:
            continue  # a hostile payload itself
        letter = ev.decode("deadletter", record.value)
        if letter.consumer == CONSUMER:
            found.setdefault((letter.source_topic, letter.partition, letter.offset), []).append(letter)

    limit = bus_settings.kafka.deadletter_payload_bytes
    for key, case in bad.items():
        got = found.get(key, [])
        assert len(got) == 1, f"case {case['name']}: {len(got)} dead letters, expected exactly one"
        letter = got[0]
        assert case["reason"] in letter.error, f"case {case['name']}: error {letter.error!r} lacks {case['reason']!r}"
        assert (letter.payload, letter.payload_bytes) == truncate_payload(case["raw"], limit), f"case {case['name']}: payload not kept"
    strays = [(k, [x.error for x in v]) for k, v in found.items() if k not in bad]
    assert not strays, f"dead letters for records that were not hostile: {strays}"
    assert letters.count == len(bad)
