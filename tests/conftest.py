"""Fixtures shared by every test area.

``stack`` starts the real embedded broker (Tansu) and Redis on free loopback ports once
per session and stops them by PID at the end. ``bus_settings`` gives each test its own
topic prefix on that broker (topics created), so tests never see each other's events,
and a Redis database flushed for it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from broadfast.core.settings import Settings

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BROADFAST_TEST_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _fresh_settings() -> Iterator[None]:
    """Each test reads the environment afresh (the process settings are cached)."""
    from broadfast.core.settings import reset_settings

    reset_settings()
    yield
    reset_settings()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only relevance data sets beside the repo (never copied into it)."""
    if not (SHARED_DATA / "homedepot" / "dev.parquet").exists():
        pytest.fail(f"the shared data sets are missing at {SHARED_DATA} (see ../shared/data/README.md)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def stack_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("broadfast-home")


@pytest.fixture(scope="session")
def stack(stack_home: Path) -> Iterator[Settings]:
    """The real embedded broker and Redis for this test session; settings that point at them."""
    from broadfast.devstack.stack import EmbeddedStack

    base = Settings(home=stack_home, topic_partitions=3)
    embedded = EmbeddedStack(base)
    state, _ = embedded.up()
    try:
        yield state.settings(base)
    finally:
        embedded.down()


@pytest.fixture
def bus_settings(stack: Settings) -> Settings:
    """Settings with a topic prefix of this test's own (its topics created) and a clean Redis."""
    import redis

    from broadfast.core.bus import ensure_topics

    settings = stack.model_copy(update={"topic_prefix": f"t{uuid.uuid4().hex[:10]}"})
    ensure_topics(settings)
    client = redis.Redis.from_url(settings.redis.redis_url)
    client.flushdb()
    client.close()
    return settings


def read_topic(settings: Settings, topic: str, *, expect: int | None = None, timeout_s: float = 15.0) -> list:
    """Every record on a topic (short name), read by a plain kafka-python consumer.

    Stops once ``expect`` records arrived, or after ``timeout_s``.
    """
    import time

    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        settings.topic(topic),
        bootstrap_servers=settings.kafka.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    records: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and (expect is None or len(records) < expect):
            for recs in consumer.poll(timeout_ms=500).values():
                records.extend(recs)
    finally:
        consumer.close()
    return records
