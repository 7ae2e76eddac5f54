"""Scoring API: backend × student layers × threads × clients, and the hot swap, in one run.

Real servers (``broadfast serve`` in subprocesses, CPU): one per inference backend (``--backends``,
default ``torch`` = PyTorch fp32, the baseline, ``openvino-int8`` and ``onnx-int8``) and student (``--model``, the
6-layer student, and ``--small``, students with fewer encoder layers, e.g. distilled with
``broadfast train offline --from-student … --layers 3``), started afresh for each thread count.
Clients post 50-ad requests (Home Depot dev titles) at each concurrency level; the servers take
turns in one order and then the reverse (half the requests each time), so the drift of a shared
machine hits them alike. Figures: client-side p50/p99 latency and pairs/s, the speed-up over
PyTorch fp32 with the 6-layer student at the same threads and clients, and each variant's dev
quality (Spearman, NDCG@10, as % of fp32 6-layer) scored in-process by the same backend code.
Then, under steady load on a server with the default backend, a new version is announced on
relevance.models: announcement → new version live (including its int8 conversion) and → first
response naming it, and p99 during the swap against the steady state.

Without ``--model`` the packaged MiniLM-L6 with an untrained head is used (and 3-layer copies of it
for ``--small-layers``): speed only, its quality figures mean nothing.

    python benchmarks/serving.py --model runs/hd6k --small runs/hd6k-l3 runs/hd6k-l2 [--threads 1,2] [--clients 1,8]
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

from benchmarks.common import embedded_or_configured_stack, invocation, markdown_table, write_result
from broadfast.core.settings import ServingSettings, Settings
from broadfast.core.datasets import load_pairs

REPO = Path(__file__).resolve().parents[1]
ADS = 50


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requests_from(data: Path, n: int, seed: int = 0) -> list[dict]:
    """n 50-ad requests: a real query and 50 real ad titles (its own candidates first, then others)."""
    df = load_pairs(data)
    rng = np.random.default_rng(seed)
    titles, ids = df["title"].to_numpy(), df["ad_id"].astype(str).to_numpy()
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
        full = os.environ | settings.public_env() | {"BROADFAST_SERVE_PORT": str(self.port), "BROADFAST_LOG_LEVEL": "WARNING"} | env
        self.log = log.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "broadfast.cli.main", "serve"], env=full, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
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


def layers_of(folder: Path) -> int:
    from broadfast.model.student import read_config

    return read_config(folder).layers


def untrained_students(tmp: Path, small_layers: list[int]) -> tuple[Path, list[Path]]:
    """The packaged MiniLM-L6 with an untrained head, and copies cut to ``small_layers`` layers (speed only)."""
    import torch

    from broadfast.training.shrink import shrink_student
    from broadfast.model.student import StudentConfig, build_student, save_student

    torch.manual_seed(0)
    student = build_student(StudentConfig.minilm())
    full = save_student(student, tmp / "minilm-l6")
    small = [save_student(shrink_student(student, n)[0], tmp / f"minilm-l{n}") for n in small_layers]
    return full, small


def quality(folder: Path, backend: str, dev, threads: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Dev Spearman and NDCG@10 of ``folder`` scored by ``backend`` in-process (the serving code's backends)."""
    import torch

    from broadfast.serving.backends import load_backend
    from broadfast.model.student import pair_texts
    from broadfast.training.metrics import evaluate
    from broadfast.model.student import load_student

    torch.set_num_threads(threads)
    student = load_student(folder, "cpu")
    student.eval()
    scorer = load_backend(student, folder, backend, "cpu", threads)
    queries, texts = pair_texts(dev)
    return evaluate(dev, scorer.predict_proba(queries, texts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="The 6-layer student (a trained model folder; copied aside). Default: packaged MiniLM-L6, untrained head.")
    parser.add_argument("--small", type=Path, nargs="*", default=[], help="Students with fewer layers (model folders).")
    parser.add_argument("--small-layers", default="3", help="Without --model: layer counts of the untrained cut-down copies.")
    parser.add_argument("--backends", default="torch,openvino-int8,onnx-int8", help="Inference backends; the first is the baseline.")
    parser.add_argument("--threads", default="1,2", help="Intra-op threads per server (BROADFAST_TORCH_THREADS).")
    parser.add_argument("--clients", default="1,8", help="Concurrent clients.")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/homedepot/dev.parquet"))
    parser.add_argument("--min-requests", type=int, default=40, help="Requests per variant and concurrency level, at least.")
    parser.add_argument("--per-client", type=int, default=4, help="Requests per client at each level (when more than --min-requests).")
    parser.add_argument("--quality-pairs", type=int, default=0, help="Dev pairs (whole queries) for the quality columns; 0 = the whole file.")
    parser.add_argument("--steady-s", type=float, default=20.0, help="Seconds of steady load before the swap.")
    parser.add_argument("--swap-threads", type=int, default=2)
    parser.add_argument("--swap-only", action="store_true", help="Only the hot swap (of --model), written to results/serving_swap.md.")
    parser.add_argument("--no-swap", action="store_true", help="Skip the hot swap (a focused latency run).")
    parser.add_argument("--notes", default="", help="How the models were made (goes under the tables).")
    parser.add_argument("--result", default="serving", help="Name of the table under benchmarks/results/ (e.g. serving_latency for a focused run).")
    args = parser.parse_args()
    backends = args.backends.split(",")
    threads_list = [int(x) for x in args.threads.split(",")]
    levels = [int(x) for x in args.clients.split(",")]

    from benchmarks.student import quality_slice
    from broadfast.core.bus import ensure_topics
    from broadfast.model.registry import Registry

    with embedded_or_configured_stack() as base, tempfile.TemporaryDirectory(prefix="broadfast-serving-bench-") as tmp:
        tmp_path = Path(tmp)
        if args.model is None:
            full, small = untrained_students(tmp_path, [int(x) for x in args.small_layers.split(",")])
        else:
            full, small = args.model, list(args.small)
        models = {f"{layers_of(f)}-layer": f for f in [full, *small]}
        baseline_model = next(iter(models))
        registries: dict[str, tuple[Settings, Path]] = {}
        for name, folder in models.items():  # one registry (and topic prefix) per student, its v0001 = the student
            s = base.model_copy(update={"registry_root": tmp_path / f"registry-{name}", "topic_prefix": f"benchserve{os.getpid()}l{name[0]}"})
            ensure_topics(s)
            manifest = Registry(s).publish(folder, announce=False)
            registries[name] = (s, Registry(s).verify(manifest.version))
        variants = [(b, m) for m in models for b in backends]
        if args.swap_only:
            swap_table = hot_swap(args, registries[baseline_model], tmp_path)
            write_result("serving_swap", "Scoring API: hot swap under load", invocation(), f"Student `{full}`.\n\n{swap_table}\n", args.notes)
            return

        figures: dict[tuple[str, str, int, int], tuple[float, float, float]] = {}
        for threads in threads_list:
            servers = {}
            try:
                for backend, model in variants:
                    env = {"BROADFAST_SERVE_BACKEND": backend, "BROADFAST_TORCH_THREADS": str(threads), "BROADFAST_SERVE_SWAP_ON_PUBLISH": "false"}
                    servers[(backend, model)] = Server(registries[model][0], env, tmp_path / f"{backend}-{model}-{threads}.log")
                for server in servers.values():
                    asyncio.run(load(server.url, requests_from(args.data, 4, seed=99), 2))  # warm-up
                for clients in levels:
                    n = max(args.min_requests, clients * args.per_client) // 2
                    runs: dict[tuple[str, str], list[tuple[list, float]]] = {v: [] for v in variants}
                    for v in [*variants, *reversed(variants)]:  # one order, then the reverse: the machine's drift hits all alike
                        results = asyncio.run(load(servers[v].url, requests_from(args.data, n, seed=clients * 100 + len(runs[v])), clients))
                        runs[v].append((results, max(e for _, e, _ in results) - min(s for s, _, _ in results)))
                    for v, parts in runs.items():
                        figures[(*v, threads, clients)] = summarize([r for results, _ in parts for r in results], sum(w for _, w in parts))
                        print(threads, clients, v, figures[(*v, threads, clients)], flush=True)
            finally:
                for server in servers.values():
                    server.stop()

        dev = load_pairs(args.data) if args.quality_pairs == 0 else quality_slice(args.data, args.quality_pairs, 0)
        quality_of = {v: quality(registries[v[1]][1], v[0], dev, max(threads_list)) for v in variants}
        base_q = quality_of[(backends[0], baseline_model)]
        rows = []
        for threads in threads_list:
            for clients in levels:
                ref = figures[(backends[0], baseline_model, threads, clients)]
                for backend, model in variants:
                    pairs_s, p50, p99 = figures[(backend, model, threads, clients)]
                    q = quality_of[(backend, model)]
                    rows.append([backend, model, threads, clients, p50, p99, pairs_s, f"{pairs_s / ref[0]:.2f}×", q["spearman"], f"{q['spearman'] / base_q['spearman']:.1%}",
                                 q["ndcg@10"], f"{q['ndcg@10'] / base_q['ndcg@10']:.1%}"])  # fmt: skip
        table = markdown_table(["backend", "student", "threads", "clients", "p50 ms", "p99 ms", "pairs/s", f"pairs/s vs {backends[0]} {baseline_model}",
                                "dev Spearman", "% of fp32 6-layer", "dev NDCG@10", "% of fp32 6-layer"], rows)  # fmt: skip
        swap_table = "" if args.no_swap else hot_swap(args, registries[baseline_model], tmp_path)

    body = (
        f"Students: {', '.join(f'{name} (`{folder}`)' for name, folder in models.items())}. {ADS}-ad requests (Home Depot dev titles), client-side latency, "
        f"{args.min_requests}+ requests per cell; the load generator runs on the same noisy cores. Dev quality on {len(dev):,} pairs of "
        f"{dev['query'].nunique()} whole queries of `{args.data.name}`, scored in-process by the same backend code.\n\n{table}\n\n{swap_table}\n"
    )
    notes = (
        "torch = PyTorch fp32; openvino-int8 = OpenVINO, static int8 (NNCF) weights and activations, length-sorted runs of 8 pairs (broadfast/serving/openvino_int8.py); "
        "onnx-int8 = ONNX Runtime, dynamic int8 per-channel weights, one pair per run (broadfast/serving/onnx_int8.py). "
        "CPU figures on shared, noisy cores: read ratios within a run. "
        + ("The students are the packaged MiniLM-L6 with an untrained head and a cut-down copy: speed only, their quality columns mean nothing. " if args.model is None else "")
        + args.notes
    )
    write_result(args.result, "Scoring API: backend × layers × threads × clients, and hot swap", invocation(), body, notes)


def hot_swap(args: argparse.Namespace, registry_of: tuple[Settings, Path], tmp_path: Path) -> str:
    """Steady load (8 clients) on a server with the default backend; announce a new version (new weights, so
    the int8 backend converts them) and time it to live and to the first response naming it."""
    import torch

    from broadfast.model.registry import Registry
    from broadfast.model.student import load_student, save_student

    settings, folder = registry_of
    registry = Registry(settings)
    student = load_student(folder)
    with torch.no_grad():  # the "next" version: the same student nudged a little
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 1e-4)
    nudged = save_student(student, tmp_path / "nudged")
    del student
    backend_setting = ServingSettings.model_fields["serve_backend"].default
    server = Server(settings, {"BROADFAST_TORCH_THREADS": str(args.swap_threads), "BROADFAST_SERVE_BACKEND": backend_setting}, tmp_path / "swap.log")
    try:
        backend = httpx.get(server.url + "/readyz").json()["backend"]["name"]
        manifest = registry.publish(nudged, announce=False)
        first_new: list[float] = []
        announced: list[float] = []
        live_at: list[float] = []
        results: list[tuple[float, float, str]] = []
        failed: list[str] = []

        async def run_all() -> None:
            bodies = requests_from(args.data, 2000, seed=7)
            stop = asyncio.Event()

            async def client_loop(client: httpx.AsyncClient, i: int) -> None:
                k = i
                while not stop.is_set():
                    t0 = time.monotonic()
                    r = await client.post("/v1/score", json=bodies[k % len(bodies)])
                    t1 = time.monotonic()
                    if r.status_code != 200:
                        failed.append(f"{r.status_code} {r.text[:200]}")
                    else:
                        version = r.json()["model_version"]
                        results.append((t0, t1, version))
                        if version == manifest.version and not first_new:
                            first_new.append(t1)
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
                        raise RuntimeError(f"the new version never served; see {tmp_path / 'swap.log'}")
                    await asyncio.sleep(0.01)
                await asyncio.sleep(3.0)
                stop.set()
                await asyncio.gather(*tasks)

        asyncio.run(run_all())
    finally:
        server.stop()
    t_ann, t_new = announced[0], first_new[0]
    steady = [(e - s) * 1000 for s, e, _ in results if e < t_ann]
    during = [(e - s) * 1000 for s, e, _ in results if e >= t_ann and s <= t_new + 2.0]
    wrong = [v for _, _, v in results if v not in ("v0001", manifest.version)]
    rows = [
        ["backend (the default setting on this machine)", f"{backend} (BROADFAST_SERVE_BACKEND={backend_setting}), {args.swap_threads} thread(s)"],
        ["announcement → new version live (loaded, converted, checked against PyTorch, probed, swapped)", f"{(live_at[0] - t_ann) * 1000:,.0f} ms"],
        ["announcement → first response from the new version", f"{(t_new - t_ann) * 1000:,.0f} ms"],
        ["p99 steady state (8 clients, 50 ads)", f"{np.percentile(steady, 99):,.0f} ms ({len(steady)} requests)"],
        ["p99 during the swap (announcement … first new response + 2 s)", f"{np.percentile(during, 99):,.0f} ms ({len(during)} requests)"],
        ["failed requests / responses naming another version", f"{len(failed)} / {len(wrong)}"],
    ]
    return markdown_table(["hot swap", "value"], rows)


if __name__ == "__main__":
    main()
