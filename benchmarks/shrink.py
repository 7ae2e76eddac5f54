"""Smaller students against the one they were shrunk from: dev quality and 50-pair latency per layer count.

Scores one dev slice (whole queries of about ``--quality-pairs`` pairs, the slice
``benchmarks/student.py`` uses) with every model folder given, the first being the reference
(the source student): Spearman, NDCG@10 and each as % of the reference. Then times requests
of one query × 50 candidate ads (tokenising included; torch fp32; the models interleaved
request by request, so background load falls on all of them alike).

    python benchmarks/shrink.py --models runs/hd,runs/hd-l3,runs/hd-l2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks.common import invocation, markdown_table, write_result
from benchmarks.student import make_requests, quality_slice, time_interleaved
from broadfast.model.student import pair_texts
from broadfast.training.metrics import evaluate
from broadfast.model.student import load_student

REPO = Path(__file__).resolve().parents[1]


def _training_seconds(folder: Path) -> float:
    path = folder / "training.json"
    try:
        return float(json.loads(path.read_text()).get("seconds", float("nan")))
    except (OSError, ValueError):
        return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", required=True, help="Comma-separated model folders; the first is the reference (100 %%).")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "homedepot" / "dev.parquet"))
    ap.add_argument("--quality-pairs", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--candidates", type=int, default=50)
    ap.add_argument("--bulk", type=int, default=500, help="Pairs scored in bulk (batch 128), interleaved by chunks.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--result", default="shrink")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    folders = [Path(m) for m in args.models.split(",")]
    students = {str(f): load_student(f, "cpu").eval() for f in folders}
    dev = quality_slice(Path(args.data), args.quality_pairs, args.seed)
    queries, texts = pair_texts(dev)
    metrics = {name: evaluate(dev, s.predict_proba(queries, texts, batch_size=128)) for name, s in students.items()}
    requests = make_requests(Path(args.data), args.requests, args.candidates, args.seed)
    bulk_q = [q for qs, _ in requests for q in qs][: args.bulk]
    bulk_t = [t for _, ts in requests for t in ts][: args.bulk]
    timed = time_interleaved(students, requests, bulk_q, bulk_t, warmup=3, chunks=5)
    ref = metrics[str(folders[0])]
    ref_p50 = float(np.percentile(timed[str(folders[0])][0], 50))
    rows = []
    for name, student in students.items():
        m, (lat, bulk_rate) = metrics[name], timed[name]
        p50 = float(np.percentile(lat, 50))
        rows.append([
            name, student.config.layers, student.parameter_counts()["inference"], m["spearman"], f"{100 * m['spearman'] / ref['spearman']:.1f} %",
            m["ndcg@10"], f"{100 * m['ndcg@10'] / ref['ndcg@10']:.1f} %", p50, f"{ref_p50 / p50:.2f}×", bulk_rate, _training_seconds(Path(name)),
        ])  # fmt: skip
        print(rows[-1], flush=True)
    body = (
        f"Dev slice: {len(dev):,} pairs of {dev['query'].nunique():,} whole queries from `{Path(args.data).name}` (seed {args.seed}); "
        f"latency: {args.requests} requests of 1 query × {args.candidates} ads, tokenising included, torch fp32, {args.threads} thread(s), "
        "the models interleaved request by request (3 warm-up requests left out); "
        f"bulk: {len(bulk_q):,} pairs, batch 128, interleaved by chunks.\n\n"
        + markdown_table(["model", "layers", "params", "Spearman", "% of ref", "NDCG@10", "% of ref", "p50 ms (50 pairs)", "speed-up", "pairs/s (bulk)", "training s"], rows)
    )
    notes = "The first model is the reference. Training seconds come from each folder's training.json (the training loop only, not the source's soft labels)."
    write_result(args.result, "Shrunk students: dev quality and latency by encoder layers", invocation(), body, notes)


if __name__ == "__main__":
    main()
