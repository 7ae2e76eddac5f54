"""Replay traffic through the embedded broker: the project's code next to raw kafka-python.

Produces the replay workload (search requests and their click events, from a relevance data
set) through the project's EventBus (validated contract objects, encoded to JSON) and through
a raw kafka-python producer sending the same pre-encoded bytes with the same client config;
then consumes them back through the project's consumer loop (decode + validate every record)
and through a raw consumer that only counts bytes. The ratio project/raw is the figure.

    python benchmarks/replay.py [--requests 3000] [--data ../shared/data/homedepot/dev.parquet]
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.common import embedded_or_configured_stack, invocation, markdown_table, write_result  # noqa: E402
from broadfast.core.settings import Settings  # noqa: E402
from broadfast.core import events as ev  # noqa: E402
from broadfast.core.bus import EventBus, consume, ensure_topics, make_consumer, make_producer  # noqa: E402
from broadfast.core.datasets import load_pairs  # noqa: E402
from broadfast.core.deadletter import DeadLetters  # noqa: E402
from broadfast.simulation.replay import ClickModel, Replayer, plan_requests  # noqa: E402


def workload(data: Path, n_requests: int, seed: int) -> list[ev.Event]:
    df = load_pairs(data, require_grade=True)
    model = ClickModel()
    out: list[ev.Event] = []
    for planned in plan_requests(df, limit=n_requests, seed=seed, run_id="bench"):
        req = planned.request
        out.append(req)
        clicks = model.draw([planned.grades[a.ad_id] for a in req.ads], np.random.default_rng([seed, planned.index]))
        out += [ev.Click(request_id=req.request_id, ts=req.ts, query=req.query, ad_id=a.ad_id, position=r, clicked=c) for r, (a, c) in enumerate(zip(req.ads, clicks))]
    return out


def fresh(settings: Settings) -> Settings:
    s = settings.model_copy(update={"topic_prefix": f"bench{uuid.uuid4().hex[:8]}"})
    ensure_topics(s)
    return s


def produce_project(settings: Settings, events: list[ev.Event]) -> float:
    # the project's path: build (validate) each contract object, encode, send
    payloads = [(type(e), e.model_dump()) for e in events]
    with EventBus(settings) as bus:
        t0 = time.perf_counter()
        for cls, data in payloads:
            bus.publish(cls(**data))
        bus.flush()
        return time.perf_counter() - t0


def produce_raw(settings: Settings, events: list[ev.Event]) -> float:
    msgs = [(settings.topic(ev.spec_for(e).name), ev.encode_key(e), ev.encode(e)) for e in events]
    producer = make_producer(settings)
    t0 = time.perf_counter()
    for topic, key, value in msgs:
        producer.send(topic, key=key, value=value)
    producer.flush()
    elapsed = time.perf_counter() - t0
    producer.close()
    return elapsed


def consume_project(settings: Settings, n: int) -> float:
    consumer = make_consumer(settings, ["requests", "clicks"], group_id=f"bench-{uuid.uuid4().hex[:6]}")
    with EventBus(settings) as bus:
        letters = DeadLetters(settings, bus, "bench")
        got, t0 = 0, None
        for delivery in consume(settings, consumer, letters, idle_polls=60):
            if delivery is None:
                continue
            t0 = t0 or time.perf_counter()
            got += 1
            if got >= n:
                break
    consumer.close()
    return time.perf_counter() - t0


def consume_raw(settings: Settings, n: int) -> float:
    consumer = make_consumer(settings, ["requests", "clicks"], group_id=f"bench-{uuid.uuid4().hex[:6]}")
    got, size, t0 = 0, 0, None
    while got < n:
        batch = consumer.poll(timeout_ms=1000, max_records=500)
        for records in batch.values():
            t0 = t0 or time.perf_counter()
            got += len(records)
            size += sum(len(r.value) for r in records)
    consumer.close()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Settings().data)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="runs per path; the best is kept")
    args = parser.parse_args()

    events = workload(args.data, args.requests, args.seed)
    n = len(events)
    rows = []
    with embedded_or_configured_stack() as base:
        best: dict[str, float] = {}
        for _ in range(args.repeat):
            for name, fn in (("produce: raw kafka-python", produce_raw), ("produce: broadfast EventBus", produce_project)):
                s = fresh(base)
                best[name] = min(best.get(name, 1e9), fn(s, events))
            s = fresh(base)
            produce_raw(s, events)
            best["consume: raw kafka-python"] = min(best.get("consume: raw kafka-python", 1e9), consume_raw(s, n))
            best["consume: broadfast consume()"] = min(best.get("consume: broadfast consume()", 1e9), consume_project(s, n))
        # end-to-end replay (frontend without scoring): requests/s and events/s
        s = fresh(base)
        df = load_pairs(args.data, require_grade=True)
        with EventBus(s) as bus:
            stats = Replayer(bus, seed=args.seed).run(plan_requests(df, limit=args.requests, seed=args.seed))
        for side in ("produce", "consume"):
            raw = best[f"{side}: raw kafka-python"]
            for name in (f"{side}: raw kafka-python", f"{side}: broadfast " + ("EventBus" if side == "produce" else "consume()")):
                rows.append([name, n, best[name], n / best[name], raw / best[name]])
        replay_events = stats.requests + stats.impressions
        rows.append(["replay CLI path (plan + clicks + produce)", replay_events, stats.elapsed_s, replay_events / stats.elapsed_s, "—"])
    body = markdown_table(["path", "events", "seconds (best of %d)" % args.repeat, "events/s", "ratio vs raw"], rows)
    notes = (
        f"Workload: {args.requests:,} search requests from `{args.data}` and their click events ({n:,} events, "
        "JSON contracts). 'broadfast' rows validate every event (pydantic) and encode/decode JSON; raw rows send "
        "pre-encoded bytes / count bytes with the same client config. The ratio is broadfast/raw throughput. "
        "CPU figures from a 2-core shared machine: noisy, compare only rows of the same run."
    )
    write_result("replay", "Replay through the embedded broker", invocation(), body, notes)


if __name__ == "__main__":
    main()
