"""Dead letters: the one helper every consumer uses for what it cannot parse or process.

A dead letter keeps the source topic, partition and offset, the reason, and the payload
truncated to ``KafkaSettings.deadletter_payload_bytes`` (invalid UTF-8 is kept visible as
escapes). Writing one never raises into the consumer loop: if even the dead-letter topic
cannot be written, the failure is logged with the same facts, and the loop goes on.
"""

from __future__ import annotations

import logging
from typing import Any

from broadfast.core.settings import Settings
from broadfast.core.events import DeadLetter, now

log = logging.getLogger(__name__)


def truncate_payload(payload: bytes | str | None, limit: int) -> tuple[str, int]:
    """The first ``limit`` bytes of a payload as text, and its full size in bytes."""
    if payload is None:
        return "", 0
    raw = payload.encode("utf-8", "surrogateescape") if isinstance(payload, str) else bytes(payload)
    head = raw[:limit].decode("utf-8", "backslashreplace")
    if len(raw) > limit:
        head += f"…[truncated, {len(raw):,} bytes]"
    return head, len(raw)


class DeadLetters:
    """Writes :class:`DeadLetter` events for one consumer; counts what it wrote."""

    def __init__(self, settings: Settings, bus: Any, consumer_name: str) -> None:
        self.settings = settings
        self.bus = bus
        self.consumer_name = consumer_name
        self.count = 0

    def send(self, source_topic: str, partition: int | None, offset: int | None, error: str, payload: bytes | str | None) -> None:
        text, size = truncate_payload(payload, self.settings.kafka.deadletter_payload_bytes)
        letter = DeadLetter(
            source_topic=source_topic,
            partition=partition,
            offset=offset,
            consumer=self.consumer_name,
            error=error[:8000] or "unknown error",
            payload=text,
            payload_bytes=size,
            ts=now(),
        )
        self.count += 1
        log.warning("dead letter from %s[%s]@%s: %s", source_topic, partition, offset, letter.error)
        try:
            self.bus.publish(letter)
        except Exception:  # noqa: BLE001 - a dead letter must never stop the consumer
            log.exception("could not write dead letter for %s[%s]@%s", source_topic, partition, offset)
