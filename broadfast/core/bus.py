"""The Kafka bus: typed producing and consuming of contract events.

:class:`EventBus` publishes events to the topic the topic table names, with the key it
names. :func:`consume` yields validated events; anything that does not validate goes to
the dead-letter topic (via :class:`~broadfast.core.deadletter.DeadLetters`) and the loop goes on.
Client configs are rendered by :class:`~broadfast.core.settings.Settings`, never here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from broadfast.core.errors import EventValidationError, StackError
from broadfast.core import connections
from broadfast.core.settings import Settings
from broadfast.core.events import TOPICS, Event, decode, encode, spec_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    """One consumed, validated event with where it came from."""

    event: Event
    topic: str
    partition: int
    offset: int
    key: bytes | None


class EventBus:
    """Publishes contract events. One per process; thread-safe (kafka-python's producer is).

    Every send is accounted for: its future's outcome counts in :attr:`delivered` or
    :attr:`undelivered` (with the last error in :attr:`last_error`), so a caller can report
    lost events instead of assuming them sent. Counts are final after :meth:`flush`.
    """

    def __init__(self, settings: Settings, producer: Any | None = None) -> None:
        self.settings = settings
        self._producer = producer if producer is not None else make_producer(settings)
        self._lock = threading.Lock()
        self.sent = 0
        self.delivered = 0
        self.undelivered = 0
        self.last_error: str | None = None

    def _ok(self, _metadata: Any) -> None:
        with self._lock:
            self.delivered += 1

    def _lost(self, topic: str, exc: BaseException) -> None:
        with self._lock:
            self.undelivered += 1
            first = self.undelivered == 1
            self.last_error = f"{topic}: {type(exc).__name__}: {exc}"
        if first:
            log.error("an event to %s was not delivered (%s: %s); further losses are counted", topic, type(exc).__name__, exc)

    @property
    def pending(self) -> int:
        """Sends neither acknowledged nor failed yet (after a timed-out :meth:`flush`: unconfirmed)."""
        with self._lock:
            return self.sent - self.delivered - self.undelivered

    def _track(self, future: Any, topic: str) -> Any:
        with self._lock:
            self.sent += 1
        future.add_callback(self._ok)
        future.add_errback(lambda exc: self._lost(topic, exc))
        return future

    def publish(self, event: Event) -> Any:
        """Send one event to its topic with its key; returns the send future."""
        spec = spec_for(event)
        payload = encode(event)
        if len(payload) > self.settings.kafka.max_event_bytes:
            raise EventValidationError(
                type(event).__name__, "<payload>", f"encoded event of {len(payload):,} bytes exceeds the limit of {self.settings.kafka.max_event_bytes:,}"
            )
        topic = self.settings.topic(spec.name)
        return self._track(self._producer.send(topic, key=spec.key_of(event).encode("utf-8"), value=payload), topic)

    def publish_raw(self, topic: str, value: bytes, key: bytes | None = None) -> Any:
        """Send bytes as they are (tests and dead letters of foreign payloads)."""
        name = self.settings.topic(topic)
        return self._track(self._producer.send(name, key=key, value=value), name)

    def flush(self, timeout: float | None = 30.0) -> None:
        """Wait for every send to be acknowledged or to fail; sends still unresolved when the
        timeout passes stay :attr:`pending` (unconfirmed) and are logged."""
        from kafka.errors import KafkaTimeoutError

        try:
            self._producer.flush(timeout=timeout)
        except KafkaTimeoutError:
            log.error("%d event(s) still unconfirmed after waiting %s s for the broker", self.pending, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Flush (what stays unconfirmed is logged and counted as :attr:`pending`), then close."""
        from kafka.errors import KafkaTimeoutError

        self.flush(timeout=timeout)
        try:
            self._producer.close(timeout=0 if self.pending else timeout)
        except KafkaTimeoutError:
            log.error("closing the producer: %d event(s) never confirmed", self.pending)

    def __enter__(self) -> EventBus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_producer(settings: Settings, **overrides: Any) -> Any:
    """A kafka-python producer for the configured broker (``overrides``: kafka-python options)."""
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    try:
        return KafkaProducer(**connections.kafka_producer(settings, **overrides))
    except KafkaError as exc:
        raise StackError(f"no Kafka broker answers at {settings.kafka.kafka_bootstrap} (is the stack up? `broadfast stack up`)") from exc


def make_consumer(settings: Settings, topics: Iterable[str], group_id: str | None, **overrides: Any) -> Any:
    """A kafka-python consumer subscribed to short topic names (none: assign partitions yourself)."""
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    names = [settings.topic(t) for t in topics]
    try:
        return KafkaConsumer(*names, **connections.kafka_consumer(settings, group_id, **overrides))
    except KafkaError as exc:
        raise StackError(f"no Kafka broker answers at {settings.kafka.kafka_bootstrap} (is the stack up? `broadfast stack up`)") from exc


def make_admin(settings: Settings, **overrides: Any) -> Any:
    """A kafka-python admin client for the configured broker."""
    from kafka.admin import KafkaAdminClient

    return KafkaAdminClient(**connections.kafka_admin(settings, **overrides))


class TopicIds:
    """The broker's id of each topic (a UUID, KIP-516), asked fresh on every call. A topic that was
    deleted and created again — or an embedded broker that restarted empty — has a new id, so
    offsets remembered under the old id no longer describe its log."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._admin: Any | None = None

    def get(self, full_topics: Iterable[str]) -> dict[str, str]:
        if self._admin is None:
            self._admin = make_admin(self.settings)
        return {t["name"]: str(t["topic_id"]) for t in self._admin.describe_topics(list(full_topics)) if t.get("topic_id") and not t.get("error_code")}

    def close(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None


def short_name(settings: Settings, full_topic: str) -> str:
    prefix = settings.kafka.topic_prefix + "."
    return full_topic[len(prefix) :] if full_topic.startswith(prefix) else full_topic


def consume(
    settings: Settings,
    consumer: Any,
    deadletters: Any,
    *,
    max_records: int = 500,
    poll_timeout_ms: int = 1000,
    idle_polls: int | None = None,
    on_deadletter: Callable[[int, int], None] | None = None,
) -> Iterator[Delivery | None]:
    """Poll ``consumer`` forever (or until ``idle_polls`` empty polls in a row).

    Yields a :class:`Delivery` for each valid event. An invalid record is sent to the
    dead-letter topic with its reason, source topic, partition and offset, and skipped.
    Yields ``None`` after each empty poll, so the caller can do periodic work and commit.
    ``on_deadletter(partition, offset)`` tells a caller that tracks its own offsets that a record
    was dead-lettered, so its next commit covers it (and a restart does not dead-letter it again).
    """
    empty = 0
    while True:
        batch = consumer.poll(timeout_ms=poll_timeout_ms, max_records=max_records)
        if not batch:
            empty += 1
            yield None
            if idle_polls is not None and empty >= idle_polls:
                return
            continue
        empty = 0
        for tp, records in batch.items():
            topic = short_name(settings, tp.topic)
            for record in records:
                try:
                    event = decode(topic, record.value, max_bytes=settings.kafka.max_event_bytes)
                except EventValidationError as exc:
                    deadletters.send(tp.topic, record.partition, record.offset, str(exc), record.value)
                    if on_deadletter is not None:
                        on_deadletter(record.partition, record.offset)
                    continue
                yield Delivery(event, tp.topic, record.partition, record.offset, record.key)


def commit(consumer: Any, offsets: dict[Any, Any] | None = None) -> bool:
    """Commit the consumer's offsets (``offsets``, else what it has consumed). A commit the group
    refuses — it rebalanced or forgot this member, as after a broker restart — is logged and
    reported as False instead of raised: the records are read again (at-least-once; each worker
    skips what it already did) and the consumer rejoins its group on its next poll.
    """
    from kafka.errors import KafkaError  # CommitFailedError among them

    try:
        if offsets is None:
            consumer.commit()
        else:
            consumer.commit(offsets)
        return True
    except KafkaError as exc:
        log.warning("offset commit refused (%s: %s): the records since the last commit will be read again after the consumer rejoins", type(exc).__name__, exc)
        return False


def ensure_topics(settings: Settings, partitions: int | None = None, timeout_s: float = 30.0) -> list[str]:
    """Create every topic of the table that does not exist yet; returns those created."""
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = make_admin(settings, request_timeout_ms=int(timeout_s * 1000))
    try:
        existing = set(admin.list_topics())
        wanted = [settings.topic(name) for name in TOPICS]
        missing = [t for t in wanted if t not in existing]
        if missing:
            n = partitions or settings.kafka.topic_partitions
            try:
                admin.create_topics([NewTopic(t, n, 1) for t in missing])
            except TopicAlreadyExistsError:
                pass  # created concurrently by another process: fine
        return missing
    finally:
        admin.close()
