"""Student inference speed: a 50-candidate request's latency and bulk pairs/s, with and without the extractor.

For each thread count (CPU) or the GPU, and each extractor (none = the plain
cross-encoder, the baseline; mlp; attention), scores N requests of one query and 50
candidate ads from a relevance set (tokenising included, as serving does; the variants
interleaved request by request, so background load hits them alike) and reports
p50/p99 latency, pairs/s, bulk pairs/s (1,000 pairs, batch 128), and the ratio to the
no-extractor baseline of the same run. A micro-benchmark times the extractor module
alone on the token states of a 50-candidate batch: the latency it adds.

With ``--backends torch,onnx-int8`` it compares inference backends (:mod:`broadfast.serving.backends`)
instead, on one student (``--model DIR``, a trained model folder, copied aside first; default:
the packaged MiniLM student with an untrained head): the same latency figures, interleaved
request by request, plus each backend's dev quality (Spearman, NDCG@10) on whole queries of
about ``--quality-pairs`` pairs and the int8 scores' distance from fp32.

    nice -n 10 python benchmarks/student.py --threads 1,2 --requests 60
    python benchmarks/student.py --backends torch,onnx-int8 --model runs/hd --threads 1,2 --requests 30
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks.common import invocation, markdown_table, write_result
from broadfast.core.datasets import load_pairs
from broadfast.model.student import pair_texts
from broadfast.model.student import StudentConfig, build_student, load_student, save_student

REPO = Path(__file__).resolve().parents[1]


def make_requests(data: Path, n: int, candidates: int, seed: int) -> list[tuple[list[str], list[str]]]:
    """N requests: a query with its own ads, filled up to ``candidates`` with random other ads."""
    df = load_pairs(data)
    _, texts = pair_texts(df)
    rng = np.random.default_rng(seed)
    by_query = df.groupby("query").indices
    chosen = rng.choice(list(by_query), size=n, replace=False)
    out = []
    for q in chosen:
        own = [texts[i] for i in by_query[q]][:candidates]
        fill = [texts[i] for i in rng.choice(len(texts), candidates - len(own), replace=False)]
        out.append(([q] * candidates, own + fill))
    return out


def time_interleaved(students: dict, requests, bulk_q: list[str], bulk_t: list[str], warmup: int = 3, chunks: int = 5) -> dict:
    """Latencies (ms) per request and bulk pairs/s of each student, interleaved round-robin.

    Each request is scored by every student in a rotating order, so background load on
    a shared machine falls on all of them alike; bulk scoring is interleaved by chunks.
    """
    names = list(students)
    for q, t in requests[:warmup]:
        for s in students.values():
            s.predict_proba(q, t, batch_size=64)
    lat: dict[str, list[float]] = {n: [] for n in names}
    for i, (q, t) in enumerate(requests):
        for n in names[i % len(names) :] + names[: i % len(names)]:
            student = students[n]
            t0 = time.perf_counter()
            student.predict_proba(q, t, batch_size=64)
            if getattr(student, "device", None) is not None and student.device.type == "cuda":
                torch.cuda.synchronize()
            lat[n].append((time.perf_counter() - t0) * 1000.0)
    bulk_s = dict.fromkeys(names, 0.0)
    size = max(1, len(bulk_q) // chunks)
    for c, start in enumerate(range(0, len(bulk_q), size)):
        for n in names[c % len(names) :] + names[: c % len(names)]:
            t0 = time.perf_counter()
            students[n].predict_proba(bulk_q[start : start + size], bulk_t[start : start + size], batch_size=128)
            bulk_s[n] += time.perf_counter() - t0
    return {n: (np.array(lat[n]), len(bulk_q) / bulk_s[n]) for n in names}


def time_extractor(student, batch: int, length: int, iters: int = 200) -> float:
    """Milliseconds the extractor alone takes on (batch, length, hidden) token states."""
    if student.extractor is None:
        return 0.0
    hidden = student.encoder.config.hidden_size
    states = torch.randn(batch, length, hidden, device=student.device)
    mask = torch.ones(batch, length, dtype=torch.long, device=student.device)
    with torch.inference_mode():
        for _ in range(10):
            student.extractor(states, mask)
        t0 = time.perf_counter()
        for _ in range(iters):
            student.extractor(states, mask)
        if student.device.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1000.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "homedepot" / "dev.parquet"))
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--candidates", type=int, default=50)
    ap.add_argument("--bulk", type=int, default=1000)
    ap.add_argument("--threads", default="1,2", help="CPU torch thread counts to try.")
    ap.add_argument("--extractors", default="none,mlp,attention")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--gpu", action="store_true", help="Also run on cuda (when available).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backends", default=None, help="Compare inference backends instead of extractors, e.g. torch,onnx-int8.")
    ap.add_argument("--model", default=None, help="With --backends: a trained model folder (default: the packaged MiniLM student).")
    ap.add_argument("--quality-pairs", type=int, default=1000, help="With --backends: about this many dev pairs (whole queries) for quality.")
    ap.add_argument("--int8-rows", default="8", help="With --backends: also time onnx-int8 with these many pairs per run (served: 1), e.g. 8,64; empty: none.")
    args = ap.parse_args()

    requests = make_requests(Path(args.data), args.requests, args.candidates, args.seed)
    bulk_q = [q for qs, _ in requests for q in qs][: args.bulk]
    bulk_t = [t for _, ts in requests for t in ts][: args.bulk]
    if args.backends:
        compare_backends(args, requests, bulk_q, bulk_t)
        return
    lengths = [len(x) for x in build_student(StudentConfig.minilm(extractor="none")).tokenize(requests[0][0], requests[0][1])["input_ids"]]
    typical_len = int(np.median(lengths))

    targets: list[tuple[str, int]] = [("cpu", int(t)) for t in args.threads.split(",")]
    if args.gpu and torch.cuda.is_available():
        targets.append(("cuda", 0))
    rows = []
    micro = []
    for device, threads in targets:
        if device == "cpu":
            torch.set_num_threads(threads)
        where = f"CPU, {threads} thread(s)" if device == "cpu" else f"GPU {torch.cuda.get_device_name(0)} (bf16)"
        students = {}
        for extractor in args.extractors.split(","):
            torch.manual_seed(0)
            students[extractor] = build_student(StudentConfig.minilm(extractor=extractor, max_length=args.max_length), device).eval()
        timed = time_interleaved(students, requests, bulk_q, bulk_t)
        base_p50 = float(np.percentile(timed[next(iter(timed))][0], 50))
        for extractor, (lat, bulk_rate) in timed.items():
            p50, p99 = float(np.percentile(lat, 50)), float(np.percentile(lat, 99))
            counts = students[extractor].parameter_counts()
            rows.append([where, extractor, counts["extractor"], p50, p99, args.candidates / (lat.mean() / 1000.0), bulk_rate, p50 / base_p50])
            micro.append([where, extractor, counts["extractor"], time_extractor(students[extractor], args.candidates, typical_len)])
            print(rows[-1], micro[-1], flush=True)
    body = (
        f"{args.requests} requests of 1 query × {args.candidates} candidate ads from `{Path(args.data).name}` "
        f"(tokenising included; max_length {args.max_length}; median pair length {typical_len} tokens), the three variants interleaved request by request; "
        f"bulk = {len(bulk_q):,} pairs, batch 128, interleaved by chunks. "
        "Baseline: the same encoder without extractor (`none`), same run.\n\n"
        + markdown_table(["device", "extractor", "extractor params", "p50 ms", "p99 ms", "pairs/s (requests)", "pairs/s (bulk)", "p50 vs none"], rows)
        + f"\n\n### The extractor alone (its forward on {args.candidates} × {typical_len} token states)\n\n"
        + markdown_table(["device", "extractor", "params", "ms per 50-candidate request"], micro)
    )
    notes = (
        "The encoder (MiniLM-L6-H384, 22.6M parameters) dominates; the extractor adds the K latent vectors and a wider head input. "
        "CPU figures come from a shared 2-core machine: absolute times are noisy, compare rows of the same run; "
        "p99 of a few dozen requests is close to their maximum."
    )
    write_result("student", "Student inference: latency and throughput with and without the extractor", invocation(), body, notes)


def quality_slice(data: Path, pairs: int, seed: int):  # type: ignore[no-untyped-def]
    """Whole dev queries, drawn at random, until about ``pairs`` pairs."""
    df = load_pairs(data)
    rng = np.random.default_rng(seed + 1)
    by_query = df.groupby("query").indices
    rows: list[int] = []
    for q in rng.permutation(list(by_query)):
        if len(rows) >= pairs:
            break
        rows.extend(by_query[q])
    return df.iloc[sorted(rows)].reset_index(drop=True)


def compare_backends(args: argparse.Namespace, requests, bulk_q: list[str], bulk_t: list[str]) -> None:  # type: ignore[no-untyped-def]
    """Latency and dev quality of each backend on one student, interleaved in the same run."""
    from scipy.stats import spearmanr

    from broadfast.serving.backends import load_backend
    from broadfast.serving.onnx_int8 import OnnxInt8Backend
    from broadfast.training.metrics import evaluate

    names = args.backends.split(",")
    dev = quality_slice(Path(args.data), args.quality_pairs, args.seed)
    dev_q, dev_t = pair_texts(dev)
    rows, quality = [], []
    with tempfile.TemporaryDirectory(prefix="broadfast-backends-") as tmp:
        folder = Path(tmp) / "model"
        if args.model:
            shutil.copytree(args.model, folder, ignore=shutil.ignore_patterns("onnx-int8", "openvino-int8"))
            what = f"the trained student `{Path(args.model).name}`"
        else:
            torch.manual_seed(0)
            save_student(build_student(StudentConfig.minilm(max_length=args.max_length)), folder)
            what = "the packaged MiniLM-L6 student (untrained extractor and head)"
        student = load_student(folder, "cpu")
        t0 = time.perf_counter()
        load_backend(student, folder, "onnx-int8", "cpu", 1)
        convert_s = time.perf_counter() - t0
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            scorers = {name: load_backend(student, folder, name, "cpu", threads) for name in names}
            if "onnx-int8" in scorers:
                int8 = scorers["onnx-int8"]
                for rows_per_run in [int(r) for r in args.int8_rows.split(",") if r]:
                    scorers[f"onnx-int8, {rows_per_run} pairs/run"] = OnnxInt8Backend(student, int8.path, threads, int8.meta, rows_per_run=rows_per_run)
            timed = time_interleaved(scorers, requests, bulk_q, bulk_t)
            base_p50 = float(np.percentile(timed[names[0]][0], 50))
            for name, (lat, bulk_rate) in timed.items():
                p50, p99 = float(np.percentile(lat, 50)), float(np.percentile(lat, 99))
                rows.append([f"CPU, {threads} thread(s)", name, p50, p99, args.candidates / (lat.mean() / 1000.0), bulk_rate, base_p50 / p50])
                print(rows[-1], flush=True)
        probs = {name: scorer.predict_proba(dev_q, dev_t, batch_size=64) for name, scorer in scorers.items()}
    metrics = {name: evaluate(dev, p) for name, p in probs.items()}
    scores = {name: p[:, 2] + 0.5 * p[:, 1] for name, p in probs.items()}
    base = names[0]
    for name in probs:
        m, b = metrics[name], metrics[base]
        quality.append([name, m["spearman"], m["ndcg@10"], m["spearman"] / b["spearman"], m["ndcg@10"] / b["ndcg@10"],
                        float(np.abs(scores[name] - scores[base]).max()), float(spearmanr(scores[name], scores[base]).statistic)])  # fmt: skip
        print(quality[-1], flush=True)
    body = (
        f"{what}, max_length {student.config.max_length}. {args.requests} requests of 1 query × {args.candidates} candidate ads from `{Path(args.data).name}` "
        f"(tokenising included), the backends interleaved request by request (onnx-int8 as served: one pair per run; `N pairs/run`: length-sorted runs of N, for comparison); bulk = {len(bulk_q):,} pairs, batch 128, interleaved by chunks. "
        f"Conversion to onnx-int8 (export, quantization, the check against PyTorch): {convert_s:.1f} s.\n\n"
        + markdown_table(["device", "backend", "p50 ms", "p99 ms", "pairs/s (requests)", "pairs/s (bulk)", f"speed-up vs {names[0]} (p50)"], rows)
        + f"\n\n### Dev quality ({len(dev):,} pairs of {dev['query'].nunique()} whole queries of `{Path(args.data).name}`)\n\n"
        + markdown_table(["backend", "Spearman", "NDCG@10", f"Spearman vs {names[0]}", f"NDCG@10 vs {names[0]}", f"max abs Δscore vs {names[0]}", f"Spearman of scores vs {names[0]}"], quality)
    )
    notes = (
        "onnx-int8: the whole student (encoder, latent reasoning extractor, head) exported with torch.onnx (TorchScript exporter) "
        "and quantized by ONNX Runtime's quantize_dynamic (QInt8 weights, dynamic uint8 activations); ONNX Runtime's intra-op threads = torch's. "
        "CPU figures come from a shared 2-core machine: compare rows of the same run."
    )
    name = "student_backends" + (f"_{Path(args.model).name}" if args.model else "")
    write_result(name, "Student inference backends: PyTorch fp32 against ONNX Runtime int8", invocation(), body, notes)


if __name__ == "__main__":
    main()
