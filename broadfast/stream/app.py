"""The stream worker (``broadfast stream``): a faust-streaming app over scored pairs and clicks.

Two agents, each taking batches of up to ``stream_batch_size`` raw records:

* ``relevance.scored`` → :class:`~broadfast.stream.sampler.HardCaseSampler` (hard cases to
  ``relevance.hardcases``) and :class:`~broadfast.stream.counters.StreamCounters` (``scored``);
* ``relevance.clicks`` → the counters (``impressions``, ``clicks``).

After each batch the touched ad/query counters are pushed to the Feast online store
(``ad_counters_push`` / ``query_counters_push``). A record that does not decode goes to the
dead-letter topic (once, not once per retry) and the batch goes on. A batch that fails is retried
(``BATCH_ATTEMPTS``), then its records are processed one by one: one that fails on its own is
dead-lettered with its reason and its neighbours go on; when every record fails, the fault is not
theirs, and the worker exits (status ``EXIT_STUCK``) before faust can commit past the batch. faust acknowledges a batch only after it was
processed and its hard cases were flushed to the broker, so the worker is at least once;
the counters are exactly once on top of that (per-partition high-water marks, see
:mod:`broadfast.stream.counters`), and a replayed hard case is re-sent, never lost.

**State lives in Redis, not in faust Tables.** Tables are changelog-backed and recovered
by reading the changelog up to its end offset; Tansu reports that offset wrong, so recovery
needs ``producer_max_batch_size=1`` (one record per produce request), and memory storage
loses changelogs with the broker anyway. Redis already holds the online features, is shared
by every worker (one labeling budget for all) and makes the offset marks atomic with the
counts in one script.

Run it: ``broadfast stream`` (or ``python -m broadfast.stream.app``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broadfast.core.errors import BroadfastError, EventValidationError
from broadfast.core import connections
from broadfast.core.connections import faust_config, stream_group
from broadfast.core.settings import Settings
from broadfast.core.events import Event, decode, encode

log = logging.getLogger(__name__)

CONSUMER_NAME = "stream"
BATCH_ATTEMPTS = 5  # tries of a failing batch (0.5 s, 1 s, 2 s, 4 s apart) before its records are tried one by one
EXIT_STUCK = 75  # the worker's exit status when a batch cannot be processed at all (EX_TEMPFAIL: restart it later)


def faust_app_id(settings: Settings) -> str:
    """The faust app id, which is also its consumer group: ``<prefix>.stream``."""
    return stream_group(settings, CONSUMER_NAME)


@dataclass
class WorkerStats:
    batches: int = 0
    scored: int = 0
    clicks: int = 0
    hardcases: int = 0
    deadletters: int = 0
    counted: int = 0
    pushed_rows: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: {"sampler": 0.0, "counters": 0.0, "push": 0.0, "publish": 0.0})


class StreamProcessor:
    """The work of the agents, as plain synchronous code (tests call it directly).

    One instance per worker process; its batches run one at a time on one thread.
    """

    def __init__(self, settings: Settings, bus: Any | None = None, redis_client: Any | None = None, feature_store: Any | None = None) -> None:
        from broadfast.core.bus import EventBus, TopicIds
        from broadfast.stream.counters import StreamCounters
        from broadfast.core.deadletter import DeadLetters
        from broadfast.stream.sampler import HardCaseSampler

        self.settings = settings
        self.bus = bus if bus is not None else EventBus(settings)
        self.redis = redis_client if redis_client is not None else connections.redis_client(settings)
        self.deadletters = DeadLetters(settings, self.bus, CONSUMER_NAME)
        self.sampler = HardCaseSampler(settings, self.redis)
        self.counters = StreamCounters(settings, self.redis)
        self.topic_ids = TopicIds(settings)
        self.store = feature_store
        if self.store is None and settings.stream.stream_push_features:
            from broadfast.features.errors import FeatureStoreError
            from broadfast.features.store import OnlineFeatures
            from broadfast.features.store import feature_store as make_store

            self.store = make_store(settings)
            try:
                OnlineFeatures(settings, store=self.store)  # fails clearly when the repo is not applied
            except FeatureStoreError as exc:
                raise FeatureStoreError(f"{exc} (or run the stream without the Feast push: --no-features / BROADFAST_STREAM_PUSH_FEATURES=false)") from exc
        self.stats = WorkerStats()

    def decode_batch(self, short_topic: str, records: Sequence[tuple[str, int, int, bytes | None]]) -> list[tuple[Event, Any]]:
        """Validated events with their source; the rest go to the dead-letter topic."""
        from broadfast.stream.sampler import Source

        out = []
        for topic, partition, offset, value in records:
            try:
                event = decode(short_topic, value, max_bytes=self.settings.kafka.max_event_bytes)
            except EventValidationError as exc:
                self.deadletters.send(topic, partition, offset, str(exc), value)
                self.stats.deadletters += 1
                continue
            out.append((event, Source(topic, partition, offset)))
        return out

    def process(self, short_topic: str, records: Sequence[tuple[str, int, int, bytes | None]]) -> None:
        """Process one batch of raw records of ``scored`` or ``clicks`` (in partition order)."""
        self.process_items(short_topic, self.decode_batch(short_topic, records))

    def isolate(self, short_topic: str, items: list[tuple[Event, Any]]) -> int:
        """A batch that kept failing, one record at a time: when some records go through, those that
        fail alone are theirs to blame — each is dead-lettered once with its reason and the rest go
        on. When none goes through, the fault is not in the records (Redis or Feast down): nothing is
        dead-lettered and the last error is raised. Returns how many records were dead-lettered."""
        failed: list[tuple[Event, Any, Exception]] = []
        for event, source in items:
            try:
                self.process_items(short_topic, [(event, source)])
            except BroadfastError:
                raise
            except Exception as exc:  # noqa: BLE001 - judged below
                failed.append((event, source, exc))
        if failed and len(failed) == len(items):
            raise failed[-1][2]
        for event, source, exc in failed:
            log.error("%s record %s[%d]@%d fails on its own (%s: %s): dead-lettered", short_topic, source.topic, source.partition, source.offset, type(exc).__name__, exc)
            self.deadletters.send(source.topic, source.partition, source.offset, f"processing failed: {type(exc).__name__}: {exc}", encode(event))
            self.stats.deadletters += 1
        self.bus.flush()
        return len(failed)

    def process_items(self, short_topic: str, items: list[tuple[Event, Any]]) -> None:
        """Process decoded records (see :meth:`decode_batch`): sample hard cases, count, push features."""
        self.stats.batches += 1
        sent = []
        if short_topic == "scored":
            self.stats.scored += len(items)
            t0 = time.perf_counter()
            hard = self.sampler.process(items)  # type: ignore[arg-type]
            t1 = time.perf_counter()
            sent = [self.bus.publish(case) for case in hard]
            self.stats.hardcases += len(hard)
            self.stats.seconds["sampler"] += t1 - t0
            self.stats.seconds["publish"] += time.perf_counter() - t1
        else:
            self.stats.clicks += len(items)
        self.bus.flush()  # hard cases and dead letters are on the broker before the batch is acked
        failed = [f.exception for f in sent if f.failed()]
        if failed:  # the batch is retried (its claims make the retry re-send, not drop, the cases)
            raise RuntimeError(f"{len(failed)} hard case(s) could not be written: {failed[0]}")
        t0 = time.perf_counter()
        lowest: dict[tuple[str, int], int] = {}
        for _, src in items:
            lowest[(src.topic, src.partition)] = min(lowest.get((src.topic, src.partition), src.offset), src.offset)
        for forgotten in self.counters.check_incarnations(lowest, self.topic_ids.get):
            log.warning("%s was created again (a new topic id: the broker restarted empty, or the topic was recreated): its events are counted from a new high-water mark, not skipped as replays", forgotten)
        applied, touched = self.counters.apply(items)
        self.stats.counted += applied
        t1 = time.perf_counter()
        self.stats.seconds["counters"] += t1 - t0
        if self.store is not None and touched:
            from broadfast.features.store import push_counters

            self.stats.pushed_rows += push_counters(self.store, self.counters.read(touched), touched)
            self.stats.seconds["push"] += time.perf_counter() - t1

    def close(self) -> None:
        try:
            self.bus.close()
            self.topic_ids.close()
        finally:
            self.redis.close()


def create_app(settings: Settings, processor: StreamProcessor | None = None) -> Any:
    """The faust app with its two agents and a periodic stats log line."""
    import faust

    cfg = faust_config(settings, faust_app_id(settings))
    Path(cfg["datadir"]).mkdir(parents=True, exist_ok=True)
    app = faust.App(**cfg)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream-batch")
    state: dict[str, StreamProcessor] = {}

    def proc() -> StreamProcessor:
        if "p" not in state:
            state["p"] = processor if processor is not None else StreamProcessor(settings)
        return state["p"]

    async def run_batch(short_topic: str, events: Sequence[Any]) -> None:
        records = [(e.message.topic, e.message.partition, e.message.offset, e.message.value) for e in events]
        loop = asyncio.get_running_loop()
        items = await loop.run_in_executor(executor, proc().decode_batch, short_topic, records)  # invalid records: dead-lettered once, not per retry
        delay = 0.5
        for attempt in range(1, BATCH_ATTEMPTS + 1):
            try:
                await loop.run_in_executor(executor, proc().process_items, short_topic, items)
                return
            except BroadfastError:
                raise
            except Exception as exc:  # noqa: BLE001 - retried, then isolated
                log.warning("batch of %d %s records failed (%s): %s", len(items), short_topic, exc, f"retry {attempt} in {delay:.1f} s" if attempt < BATCH_ATTEMPTS else "processing its records one by one")
                if attempt < BATCH_ATTEMPTS:
                    await asyncio.sleep(delay)
                    delay *= 2
        try:
            await loop.run_in_executor(executor, proc().isolate, short_topic, items)
        except Exception:  # noqa: BLE001 - not the records' fault: stop for real, before faust commits past them
            log.exception("batch of %d %s records failed %d times and every record fails on its own: stopping the worker now (exit %d); its offsets are not committed, so a restarted worker reads the batch again", len(items), short_topic, BATCH_ATTEMPTS, EXIT_STUCK)
            logging.shutdown()
            os._exit(EXIT_STUCK)

    def agent_for(short_topic: str) -> None:
        topic = app.topic(settings.topic(short_topic), value_serializer="raw", key_serializer="raw")

        async def agent(stream: Any) -> None:
            async for events in stream.take_events(settings.stream.stream_batch_size, within=settings.stream.stream_batch_within_s):
                await run_batch(short_topic, events)

        agent.__name__ = f"{short_topic}_agent"
        app.agent(topic, name=f"{faust_app_id(settings)}.{short_topic}")(agent)

    agent_for("scored")
    agent_for("clicks")

    @app.timer(interval=30.0)
    async def report() -> None:
        if "p" in state:
            s = state["p"].stats
            log.info(
                "stream: %d scored, %d clicks, %d hard cases (%s), %d dead letters, %d counted",
                s.scored, s.clicks, s.hardcases, state["p"].sampler.stats.as_dict(), s.deadletters, s.counted,
            )

    app._broadfast_processor = proc
    return app


def run_worker(settings: Settings) -> None:
    """Run one faust worker in this process until SIGINT/SIGTERM."""
    import faust

    from broadfast.core.bus import ensure_topics

    ensure_topics(settings)
    app = create_app(settings)
    app._broadfast_processor()  # connect Redis, the bus and Feast before joining the group
    worker = faust.Worker(app, loglevel=settings.log_level.lower(), quiet=True)
    log.info("stream worker %s on %s (%s flavor)", faust_app_id(settings), settings.kafka.kafka_bootstrap, settings.kafka.kafka_flavor)
    try:
        worker.execute_from_commandline()
    finally:
        app._broadfast_processor().close()


if __name__ == "__main__":  # pragma: no cover - `python -m broadfast.stream.app`
    from broadfast.core.logs import command_settings

    run_worker(command_settings())
