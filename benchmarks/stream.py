"""Benchmark of the stream worker and of the serving-side feature read.

1. **Stream throughput.** N scored events (requests of up to 50 ads from a relevance data
   set, Dirichlet grade probabilities) are written to the embedded broker first. Baseline:
   a raw kafka-python consumer (``broadfast.core.bus.consume``: poll + decode + validate) reads them.
   Then one faust worker (``python -m broadfast.stream.app``, what ``broadfast stream`` runs) processes
   the same events — hard-case sampling, exactly-once counters, and (second run) pushes to
   Feast. Rates exclude the worker's start-up (timed from its first counted event).
2. **Sampler latency.** ``HardCaseSampler.process`` on batches of the same events, in process.
3. **Feature read for one 50-ad request.** ``OnlineFeatures.read`` (one
   ``get_online_features`` call: ad attributes + ad and query counters) next to a raw Redis
   read of the same values (the same HMGETs in one pipeline + protobuf decoding), and next to
   the student-side work of the same request (MiniLM encoding of 50 titles, 1 torch thread).

Run:  .venv/bin/python benchmarks/stream.py [--events 20000] [--reads 300]
Writes benchmarks/results/stream.md. Two shared, noisy CPU cores: absolute times move by
±20 % between runs; the ratios are the figures to read.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from broadfast.core.settings import Settings
from broadfast.core.bus import EventBus, consume, ensure_topics, make_consumer
from broadfast.core.datasets import load_pairs
from broadfast.core.events import Scored
from broadfast.model.student import text_read


def make_events(data: Path, n: int, seed: int = 0) -> list[Scored]:
    df = load_pairs(data)
    rng = np.random.default_rng(seed)
    groups = list(df.groupby("query"))
    events: list[Scored] = []
    ts = 1_700_000_000.0
    r = 0
    while len(events) < n:
        query, g = groups[int(rng.integers(len(groups)))]
        ads = g.sample(min(len(g), 50), random_state=int(rng.integers(1 << 30)))
        arm = "challenger" if rng.random() < 0.2 else "champion"
        for pos, (_, row) in enumerate(ads.iterrows()):
            probs = rng.dirichlet((1.0, 2.0, 2.0))
            probs = tuple(float(x) for x in probs / probs.sum())
            probs = (probs[0], probs[1], 1.0 - probs[0] - probs[1])
            events.append(
                Scored(request_id=f"b{r}", ts=ts, query=query, ad_id=row["ad_id"], title=row["title"], text=text_read(row.get("text")), position=pos,
                       score=min(1.0, probs[2] + 0.5 * probs[1]), grade_probs=probs, model_version="bench", arm=arm, latency_ms=1.0)
            )
        ts += 0.05
        r += 1
    return events[:n]


def produce(settings: Settings, events: list[Scored]) -> None:
    ensure_topics(settings)
    with EventBus(settings) as bus:
        for ev in events:
            bus.publish(ev)


def raw_consumer_rate(settings: Settings, n: int) -> float:
    class Quiet:
        def send(self, *a: object) -> None:
            raise AssertionError("no dead letters expected")

    consumer = make_consumer(settings, ["scored"], None)
    got, t0 = 0, None
    for d in consume(settings, consumer, Quiet(), idle_polls=20):
        if d is None:
            if got >= n:
                break
            continue
        if t0 is None:
            t0 = time.perf_counter()
        got += 1
        if got >= n:
            break
    dt = time.perf_counter() - t0
    consumer.close()
    return (got - 1) / dt


def counted(client, settings: Settings) -> int:
    return sum(int(v) + 1 for v in client.hgetall(f"{settings.kafka.topic_prefix}:stream:hwm").values())


def noop_worker(settings: Settings) -> None:
    """A faust worker with the same config whose agent only decodes and records offsets:
    faust's own ceiling on this machine (run as a subprocess by faust_rate(noop=True))."""
    import faust
    import redis

    from broadfast.core.connections import faust_config
    from broadfast.core.events import decode

    cfg = faust_config(settings) | {"id": faust_config(settings)["id"] + "-noop"}
    Path(cfg["datadir"]).mkdir(parents=True, exist_ok=True)
    app = faust.App(**cfg)
    client = redis.Redis.from_url(settings.redis.redis_url)
    topic = app.topic(settings.topic("scored"), value_serializer="raw", key_serializer="raw")

    @app.agent(topic)
    async def noop(stream):
        async for events in stream.take_events(settings.stream.stream_batch_size, within=settings.stream.stream_batch_within_s):
            marks = {}
            for e in events:
                decode("scored", e.message.value)
                marks[f"{e.message.topic}:{e.message.partition}"] = e.message.offset
            client.hset(f"{settings.kafka.topic_prefix}:stream:hwm", mapping=marks)

    faust.Worker(app, loglevel="warning", quiet=True).execute_from_commandline()


def faust_rate(settings: Settings, n: int, log_path: Path, noop: bool = False) -> tuple[float, float]:
    """(events/s after the first counted event, start-up seconds)."""
    import redis

    env = {k: v for k, v in os.environ.items() if not k.startswith("BROADFAST_")} | settings.public_env()
    client = redis.Redis.from_url(settings.redis.redis_url)
    argv = [sys.executable, str(Path(__file__).resolve()), "--noop-worker"] if noop else [sys.executable, "-m", "broadfast.stream.app"]
    with open(log_path, "ab") as out:
        t_start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        first_at = first_n = None
        while True:
            c = counted(client, settings)
            now = time.perf_counter()
            if first_at is None and c > 0:
                first_at, first_n = now, c
            if c >= n:
                break
            if proc.poll() is not None or now - t_start > 600:
                raise RuntimeError(f"worker stopped or stalled at {c}/{n}; see {log_path}")
            time.sleep(0.02)
        return (n - first_n) / (now - first_at), first_at - t_start
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        client.close()


def sampler_latency(settings: Settings, events: list[Scored], batch: int) -> dict[str, float]:
    import redis

    from broadfast.core.events import decode, encode
    from broadfast.stream.sampler import HardCaseSampler, Source

    client = redis.Redis.from_url(settings.redis.redis_url)
    sampler = HardCaseSampler(settings, client)
    times, decode_times = [], []
    for i in range(0, len(events), batch):
        raw = [encode(ev) for ev in events[i : i + batch]]
        t0 = time.perf_counter()
        decoded = [decode("scored", r) for r in raw]  # the baseline: what any consumer does per batch
        t1 = time.perf_counter()
        sampler.process([(ev, Source("bench", 0, i + j)) for j, ev in enumerate(decoded)])
        times.append(time.perf_counter() - t1)
        decode_times.append(t1 - t0)
    client.close()
    per_event = sum(times) / len(events)
    return {"batch_p50_ms": statistics.median(times) * 1e3, "batch_p99_ms": float(np.percentile(times, 99)) * 1e3, "per_event_us": per_event * 1e6,
            "decode_p50_ms": statistics.median(decode_times) * 1e3, "hard": sampler.stats.hard, "emitted": sampler.stats.emitted}


def feature_reads(settings: Settings, data: Path, reps: int) -> dict[str, dict[str, float]]:
    import redis
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.infra.online_stores.helpers import _mmh3
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    from broadfast.features.definitions import AD_ATTRIBUTE_FEATURES, counter_features
    from broadfast.features.store import OnlineFeatures, apply, materialize, push_counters
    from broadfast.stream.counters import CounterValues
    from broadfast.core.events import normalize_query

    apply(settings, data)
    materialize(settings)
    df = load_pairs(data)
    reader = OnlineFeatures(settings)
    rng = np.random.default_rng(1)
    ads_all = df["ad_id"].unique().tolist()
    queries = df["query"].unique().tolist()
    values = {("ad", a): CounterValues(int(rng.integers(50)), int(rng.integers(50)), int(rng.integers(5))) for a in ads_all}
    values |= {("query", normalize_query(q)): CounterValues(10, 10, 1) for q in queries}
    push_counters(reader.store, values, {k: 0 for k in values})

    project = settings.features.feast_project
    version = reader.store.config.entity_key_serialization_version
    ad_views = {"ad_attributes": AD_ATTRIBUTE_FEATURES, "ad_stream_counters": counter_features("ad")}
    ad_fields = [_mmh3(f"{v}:{f}") for v, fs in ad_views.items() for f in fs] + [f"_ts:{v}" for v in ad_views]
    q_fields = [_mmh3(f"query_stream_counters:{f}") for f in counter_features("query")] + ["_ts:query_stream_counters"]
    names = [f for fs in ad_views.values() for f in fs]
    client = redis.Redis.from_url(settings.redis.redis_url)

    def key(join: str, value: str) -> bytes:
        return serialize_entity_key(EntityKey(join_keys=[join], entity_values=[Value(string_val=value)]), entity_key_serialization_version=version) + project.encode()

    def decode(raw: bytes | None) -> float:
        if raw is None:
            return 0.0
        v = Value.FromString(raw)
        kind = v.WhichOneof("val")
        return float(getattr(v, kind)) if kind else 0.0

    def raw_read(query: str, ads: list[str]) -> list[dict[str, float]]:
        pipe = client.pipeline(transaction=False)
        for a in ads:
            pipe.hmget(key("ad_id", a), ad_fields)
        pipe.hmget(key("query", normalize_query(query)), q_fields)
        replies = pipe.execute()
        qv = {n: decode(r) for n, r in zip(counter_features("query"), replies[-1])}
        return [{n: decode(r) for n, r in zip(names, row)} | qv for row in replies[:-1]]

    requests = [(str(rng.choice(queries)), [str(a) for a in rng.choice(ads_all, 50, replace=False)]) for _ in range(reps)]
    # the two reads agree
    q, ads = requests[0]
    a, b = reader.read(q, ads), raw_read(q, ads)
    assert all(abs(x[k] - y[k]) < 1e-9 for x, y in zip(a, b) for k in y), "raw read and Feast read disagree"

    out: dict[str, dict[str, float]] = {}
    readers = {"feast get_online_features (OnlineFeatures.read)": reader.read, "raw Redis HMGET pipeline + protobuf decode": raw_read}
    times: dict[str, list[float]] = {name: [] for name in readers}
    for q, ads in requests:  # interleaved, so both see the same noise
        for name, fn in readers.items():
            t0 = time.perf_counter()
            fn(q, ads)
            times[name].append(time.perf_counter() - t0)
    for name, t in times.items():
        out[name] = {"p50_ms": statistics.median(t) * 1e3, "p99_ms": float(np.percentile(t, 99)) * 1e3}
    client.close()

    try:
        import torch

        from broadfast.model.embedder import Embedder

        torch.set_num_threads(1)
        emb = Embedder()
        titles = df["title"].head(50).tolist()
        emb.encode(titles)
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            emb.encode([q] + titles)
            times.append(time.perf_counter() - t0)
        out["reference: MiniLM encode of 1 query + 50 titles"] = {"p50_ms": statistics.median(times) * 1e3, "p99_ms": max(times) * 1e3}
    except Exception as exc:  # noqa: BLE001 - the reference row is optional
        print(f"(no MiniLM reference: {exc})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--reads", type=int, default=300)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "homedepot" / "dev.parquet")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "stream.md")
    ap.add_argument("--noop-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.noop_worker:
        noop_worker(Settings())
        return

    from broadfast.devstack.stack import EmbeddedStack

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bf-bench-stream-") as tmp:
        home = Path(tmp)
        stack = EmbeddedStack(Settings(home=home, topic_partitions=3))
        state, _ = stack.up()
        try:
            base = state.settings(Settings(home=home), stream_web_port=0, feast_data=home / "feast", data=args.data)
            events = make_events(args.data, args.events)
            print(f"{len(events)} scored events from {args.data.name}")
            runs = {}
            for prefix, push in (("noop", False), ("nopush", False), ("push", True)):
                s = base.model_copy(update={"topic_prefix": prefix, "stream_push_features": push})
                produce(s, events)
                if push:
                    from broadfast.features.store import apply

                    apply(s, args.data)
                runs[prefix] = s
            raw_before = raw_consumer_rate(runs["nopush"], len(events))
            print(f"raw consumer: {raw_before:,.0f} events/s")
            faust_noop, _ = faust_rate(runs["noop"], len(events), home / "worker-noop.log", noop=True)
            print(f"faust (no-op agent): {faust_noop:,.0f} events/s")
            faust_np, start_np = faust_rate(runs["nopush"], len(events), home / "worker-nopush.log")
            print(f"faust (no push): {faust_np:,.0f} events/s (start-up {start_np:.1f} s)")
            faust_p, start_p = faust_rate(runs["push"], len(events), home / "worker-push.log")
            print(f"faust (push): {faust_p:,.0f} events/s (start-up {start_p:.1f} s)")
            raw_after = raw_consumer_rate(runs["push"], len(events))
            raw = (raw_before + raw_after) / 2  # before and after the worker runs: the same noise
            print(f"raw consumer again: {raw_after:,.0f} events/s")
            lat = sampler_latency(base.model_copy(update={"topic_prefix": "lat"}), events, 500)
            print(f"sampler: {lat}")
            reads = feature_reads(base.model_copy(update={"topic_prefix": "reads"}), args.data, args.reads)
            for k, v in reads.items():
                print(f"{k}: {v}")
        finally:
            stack.down()

    feast_p50 = reads["feast get_online_features (OnlineFeatures.read)"]["p50_ms"]
    raw_p50 = reads["raw Redis HMGET pipeline + protobuf decode"]["p50_ms"]
    lines = [
        "# Stream worker and feature read benchmark",
        "",
        (
            f"`benchmarks/stream.py --events {args.events} --reads {args.reads}`; embedded Tansu broker + Valkey on loopback, 3 partitions, "
            f"one faust worker; 2 shared, noisy CPU cores, 1-min load average {load_before:.1f} at the start and {os.getloadavg()[0]:.1f} at the end "
            "(other work ran beside it: absolute figures move a lot between runs, read the ratios)."
        ),
        "",
        "## Scored events through one worker",
        "",
        "| path | events/s | vs raw consumer |",
        "| --- | ---: | ---: |",
        f"| baseline: raw kafka-python consumer (poll + decode + validate; mean of {raw_before:,.0f} before and {raw_after:,.0f} after) | {raw:,.0f} | 1.00 |",
        f"| faust worker, same config, agent only decodes (faust's own ceiling) | {faust_noop:,.0f} | {faust_noop / raw:.2f} |",
        f"| faust worker: sampler + exactly-once counters | {faust_np:,.0f} | {faust_np / raw:.2f} |",
        f"| faust worker: sampler + counters + Feast push | {faust_p:,.0f} | {faust_p / raw:.2f} |",
        "",
        f"Worker start-up (process start to first counted event): {start_np:.1f} s / {start_p:.1f} s.",
        "",
        "## Latency the sampler adds (batches of 500, in process, Redis on loopback)",
        "",
        "| sampler: batch p50 | batch p99 | per event | baseline: decode + validate of the batch, p50 | sampler / decode | hard / emitted (budget burst 20) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        (
            f"| {lat['batch_p50_ms']:.1f} ms | {lat['batch_p99_ms']:.1f} ms | {lat['per_event_us']:.0f} µs | {lat['decode_p50_ms']:.1f} ms "
            f"| {lat['batch_p50_ms'] / lat['decode_p50_ms']:.1f}× | {lat['hard']} / {lat['emitted']} |"
        ),
        "",
        "## Serving feature read: one request of 50 ads (ad attributes + ad and query counters)",
        "",
        "| read | p50 ms | p99 ms | vs raw Redis |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, v in reads.items():
        lines.append(f"| {name} | {v['p50_ms']:.2f} | {v['p99_ms']:.2f} | {v['p50_ms'] / raw_p50:.1f}× |")
    lines += ["", f"Feast / raw Redis at p50: {feast_p50 / raw_p50:.1f}×.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
