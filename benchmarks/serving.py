"""Scoring API: micro-batching against a naive server, and the hot swap, in one run.

Two real servers (``broadfast serve`` in subprocesses, same MiniLM-L6 student, CPU, one torch
thread): the batched one (default settings) and the naive baseline (``BROADFAST_SERVE_BATCHING=false``:
each request's 50 pairs run alone, one request after another). Clients post 50-ad requests
(Home Depot dev titles) at 1, 8 and 32 concurrent clients, in ABBA order (batched, naive, naive,
batched: half the requests each time) so the drift of a shared machine hits both alike; throughput (pairs/s) and client-side
p50/p99 latency; the ratio batched/naive is the figure. Then, under steady load on the
batched server, a new version is announced on relevance.models: time from the announcement
to the first response naming it, and p99 during the swap against the steady state.

    python benchmarks/serving.py [--data ../shared/data/homedepot/dev.parquet] [--min-requests 24] [--per-client 4] [--steady-s 25]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import numpy as np

from benchmarks.common import embedded_or_configured_stack, markdown_table, write_result
from broadfast.settings import Settings
from streams.datasets import load_pairs

REPO = Path(__file__).resolve().parents[1]
ADS = 50
LEVELS = (1, 8, 32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requests_from(data: Path, n: int, seed: int = 0) -> list[dict]:
    """n 50-ad requests: a real query and 50 real ad titles (its own candidates first, then others)."""
    df = load_pairs(data)
    rng = np.random.default_rng(seed)
    titles, ids = df["title"].to_numpy(), df["product_id"].astype(str).to_numpy()
    groups = list(df.groupby("query").indices.items())
    out = []
    for i in range(n):
        query, idx = groups[rng.integers(len(groups))]
        rest = rng.choice(len(df), size=ADS - min(len(idx), ADS), replace=False)
        pick = list(idx[:ADS]) + list(rest)
        out.append({"query": query, "user_id": f"bench-{i % 997}", "ads": [{"ad_id": ids[j], "title": titles[j]} for j in pick]})
    return out


class Server:
    """`broadfast serve` in a subprocess on a free port."""

    def __init__(self, settings: Settings, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full = os.environ | settings.public_env() | {"BROADFAST_SERVE_PORT": str(self.port), "BROADFAST_TORCH_THREADS": "1", "BROADFAST_LOG_LEVEL": "WARNING"} | env
        self.log = log.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "broadfast.cli", "serve"], env=full, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {log}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server not ready after 180 s")
            time.sleep(0.3)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def load(url: str, bodies: list[dict], clients: int) -> list[tuple[float, float, str]]:
    """Post ``bodies`` through ``clients`` concurrent clients; (start, end, model_version) per request."""
    queue: asyncio.Queue = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    out: list[tuple[float, float, str]] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            t0 = time.monotonic()
            r = await client.post("/v1/score", json=body)
            r.raise_for_status()
            version = r.json()["model_version"]
            out.append((t0, time.monotonic(), version))

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    return out


def summarize(results: list[tuple[float, float, str]], wall: float) -> tuple[float, float, float]:
    """(pairs/s over ``wall`` seconds, p50 ms, p99 ms)."""
    lat = np.array([(e - s) * 1000 for s, e, _ in results])
    return len(results) * ADS / wall, float(np.percentile(lat, 50)), float(np.percentile(lat, 99))


def batch_stats(url: str) -> float:
    page = httpx.get(url + "/metrics").text
    vals = {line.split(" ")[0]: float(line.split(" ")[1]) for line in page.splitlines() if line.startswith("broadfast_serving_batch_pairs_")}
    return vals.get("broadfast_serving_batch_pairs_sum", 0.0) / max(vals.get("broadfast_serving_batch_pairs_count", 1.0), 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/homedepot/dev.parquet"))
    parser.add_argument("--steady-s", type=float, default=25.0, help="Seconds of steady load before the swap.")
    parser.add_argument("--min-requests", type=int, default=24, help="Requests per concurrency level, at least.")
    parser.add_argument("--per-client", type=int, default=4, help="Requests per client at each level (when more than --min-requests).")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from training.registry import Registry
    from training.student import StudentConfig, build_student, save_student

    with embedded_or_configured_stack() as base, tempfile.TemporaryDirectory(prefix="broadfast-serving-bench-") as tmp:
        tmp_path = Path(tmp)
        settings = base.model_copy(update={"registry_root": tmp_path / "registry", "topic_prefix": f"benchserve{os.getpid()}"})
        from streams.bus import ensure_topics

        ensure_topics(settings)
        torch.manual_seed(0)
        student = build_student(StudentConfig.minilm())
        save_student(student, tmp_path / "a")
        with torch.no_grad():  # the "next" version: the same student nudged a little
            for p in student.parameters():
                p.add_(torch.randn_like(p) * 1e-3)
        save_student(student, tmp_path / "b")
        del student
        registry = Registry(settings)
        registry.publish(tmp_path / "a")

        rows = []
        figures: dict[tuple[str, int], tuple[float, float, float]] = {}
        batch_mean: dict[str, float] = {}
        servers = {"batched": Server(settings, {}, tmp_path / "batched.log"), "naive": Server(settings, {"BROADFAST_SERVE_BATCHING": "false"}, tmp_path / "naive.log")}
        try:
            for server in servers.values():
                asyncio.run(load(server.url, requests_from(args.data, 8, seed=99), 4))  # warm-up
            for clients in LEVELS:
                n = max(args.min_requests, clients * args.per_client) // 2
                runs: dict[str, list[tuple[list, float]]] = {"batched": [], "naive": []}
                for name in ("batched", "naive", "naive", "batched"):  # ABBA: the machine's drift hits both alike
                    results = asyncio.run(load(servers[name].url, requests_from(args.data, n, seed=clients + len(runs[name])), clients))
                    runs[name].append((results, max(e for _, e, _ in results) - min(s for s, _, _ in results)))
                for name, parts in runs.items():
                    figures[(name, clients)] = summarize([r for results, _ in parts for r in results], sum(w for _, w in parts))
                    print(name, clients, figures[(name, clients)], flush=True)
            batch_mean = {name: batch_stats(server.url) for name, server in servers.items()}
        finally:
            for server in servers.values():
                server.stop()
        for clients in LEVELS:
            b, n = figures[("batched", clients)], figures[("naive", clients)]
            rows.append([clients, b[0], n[0], f"{b[0] / n[0]:.2f}×", b[1], n[1], b[2], n[2], f"{n[2] / b[2]:.2f}×"])
        table = markdown_table(
            ["clients", "batched pairs/s", "naive pairs/s", "throughput ratio", "batched p50 ms", "naive p50 ms", "batched p99 ms", "naive p99 ms", "p99 naive/batched"], rows
        )

        # -- hot swap under steady load (8 clients) -------------------------------------------------
        server = Server(settings, {}, tmp_path / "swap.log")
        try:
            manifest = registry.publish(tmp_path / "b", announce=False)
            first_new: list[float] = []
            announced: list[float] = []
            live_at: list[float] = []

            def on_response(version: str, t: float) -> None:
                if version == manifest.version and not first_new:
                    first_new.append(t)

            results: list[tuple[float, float, str]] = []

            async def run_all() -> None:
                nonlocal results
                collected: list[tuple[float, float, str]] = []
                queue_bodies = requests_from(args.data, 2000, seed=7)
                stop = asyncio.Event()

                async def client_loop(client: httpx.AsyncClient, i: int) -> None:
                    k = i
                    while not stop.is_set():
                        t0 = time.monotonic()
                        r = await client.post("/v1/score", json=queue_bodies[k % len(queue_bodies)])
                        r.raise_for_status()
                        t1 = time.monotonic()
                        collected.append((t0, t1, r.json()["model_version"]))
                        on_response(r.json()["model_version"], t1)
                        k += 8

                async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=httpx.Limits(max_connections=12)) as client:
                    tasks = [asyncio.create_task(client_loop(client, i)) for i in range(8)]
                    await asyncio.sleep(args.steady_s)
                    announced.append(time.monotonic())
                    await asyncio.to_thread(registry.announce, manifest)
                    async with httpx.AsyncClient(base_url=server.url, timeout=30) as probe_client:  # when does the server name it champion?
                        while (await probe_client.get("/readyz")).json()["champion"] != manifest.version:
                            if time.monotonic() - announced[0] > 120:
                                raise RuntimeError(f"the new version was not live within 120 s; see {tmp_path / 'swap.log'}")
                            await asyncio.sleep(0.02)
                    live_at.append(time.monotonic())
                    while not first_new:
                        if time.monotonic() - announced[0] > 240:
                            raise RuntimeError(f"the new version never served within 120 s; see {tmp_path / 'swap.log'}")
                        await asyncio.sleep(0.01)
                    await asyncio.sleep(5.0)
                    stop.set()
                    await asyncio.gather(*tasks)
                results = collected

            asyncio.run(run_all())
        finally:
            server.stop()
        t_ann, t_new = announced[0], first_new[0]
        steady = [(e - s) * 1000 for s, e, _ in results if e < t_ann]
        during = [(e - s) * 1000 for s, e, _ in results if e >= t_ann and s <= t_new + 2.0]
        wrong = [v for s, e, v in results if v not in ("v0001", manifest.version)]
        swap_rows = [
            ["announcement → new version live (server loaded, checked and swapped it)", f"{(live_at[0] - t_ann) * 1000:,.0f} ms"],
            ["announcement → first response from the new version (includes the requests queued before it)", f"{(t_new - t_ann) * 1000:,.0f} ms"],
            ["p99 steady state (8 clients, 50 ads)", f"{np.percentile(steady, 99):,.0f} ms ({len(steady)} requests)"],
            ["p99 during the swap (announcement … first new response + 2 s)", f"{np.percentile(during, 99):,.0f} ms ({len(during)} requests)"],
            ["failed requests / responses naming another version", f"0 / {len(wrong)}"],
        ]
        swap_table = markdown_table(["hot swap (batched server, MiniLM-L6, CPU)", "value"], swap_rows)

    body = (
        f"MiniLM-L6 student (all-MiniLM-L6-v2 encoder + MLP extractor, max_length 128), CPU, **one torch thread per server**; "
        f"requests of {ADS} ads (Home Depot dev titles); client-side latency; the load generator runs on the same 2 noisy cores.\n\n"
        f"{table}\n\nMean pairs per forward micro-batch: batched {batch_mean['batched']:.0f}, naive {batch_mean['naive']:.0f}.\n\n{swap_table}\n"
    )
    notes = (
        "Naive = the same server with `BROADFAST_SERVE_BATCHING=false` (each request's pairs in their own forward pass, one request at a time). "
        "CPU figures on 2 shared, noisy cores: read the ratios, not the absolute times. "
        "GPU (H100/H200) absolute p99 for a 50-ad request: not measured (no GPU in this session)."
    )
    write_result("serving", "Scoring API: micro-batching vs naive, and hot swap", "python benchmarks/serving.py", body, notes)


if __name__ == "__main__":
    main()
