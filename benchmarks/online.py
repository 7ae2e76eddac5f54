"""Label efficiency: the hard-case sampler against uniform random sampling, oracle teacher.

From a weak student (trained on a small human-labelled slice), each arm spends the same
labelling budget in rounds on a pool of unlabelled pairs: the *sampler* arm asks the
teacher for the pairs the current student is least sure of (the stream app's uncertainty
score: normalised entropy of the grade distribution, ties broken by the smaller margin);
the *random* arm draws uniformly. The oracle teacher answers with the human judgement.
After each round both students are evaluated on a query-disjoint dev split (NDCG@10,
Spearman). Same seed, same start, same training code (training/online.py's round).

The figure: the share of labels the sampler needs to reach random sampling's final quality.

    python benchmarks/online.py [--student minilm|tiny] [--rounds 8] [--budget 100] [--pool 3000]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import invocation, markdown_table, write_result  # noqa: E402
from broadfast.settings import Settings  # noqa: E402
from streams.datasets import load_pairs  # noqa: E402
from streams.sampler import margin, normalized_entropy  # noqa: E402
from training.distill import TrainConfig, train_offline_frame  # noqa: E402
from training.metrics import evaluate  # noqa: E402
from training.online import LabelRow, OnlineTrainer  # noqa: E402
from training.student import StudentConfig, ad_text  # noqa: E402
from training.targets import human_targets, relevance_to_probs  # noqa: E402


def texts_of(df: pd.DataFrame) -> list[str]:
    return [ad_text(t, d) for t, d in zip(df["title"], df["description"])]


def query_split(df: pd.DataFrame, n_queries: int, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    queries = rng.permutation(df["query"].unique())
    picked = set(queries[:n_queries])
    mask = df["query"].isin(picked)
    return df[mask].reset_index(drop=True), df[~mask].reset_index(drop=True)


def oracle_rows(df: pd.DataFrame, idx: np.ndarray, low: float, high: float) -> list[LabelRow]:
    probs = relevance_to_probs(df["relevance"].to_numpy()[idx], low, high)
    texts = texts_of(df.iloc[idx])
    return [LabelRow(pair_id=str(i), query=q, text=t, probs=[float(x) for x in p], rationale=None, partition=0, offset=int(i)) for i, q, t, p in zip(idx, df["query"].to_numpy()[idx], texts, probs)]


def hardness(probs: np.ndarray) -> np.ndarray:
    """Higher is harder: normalised entropy, minus a small margin term to break ties."""
    return np.array([normalized_entropy(p) - 1e-3 * margin(p) for p in probs])


def run_arm(name: str, trainer: OnlineTrainer, pool: pd.DataFrame, dev: pd.DataFrame, args: argparse.Namespace, scale: tuple[float, float]) -> list[dict]:
    rng = np.random.default_rng(args.seed)
    labelled = np.zeros(len(pool), dtype=bool)
    pool_texts = texts_of(pool)
    curve = []
    metrics = evaluate(dev, trainer.student.predict_proba(dev["query"].tolist(), texts_of(dev)))
    curve.append({"arm": name, "labels": 0, **metrics})
    for r in range(args.rounds):
        candidates = np.flatnonzero(~labelled)
        if name == "sampler":
            probs = trainer.student.predict_proba(pool["query"].to_numpy()[candidates].tolist(), [pool_texts[i] for i in candidates], batch_size=128)
            pick = candidates[np.argsort(-hardness(probs), kind="stable")[: args.budget]]
        else:
            pick = rng.choice(candidates, size=min(args.budget, len(candidates)), replace=False)
        labelled[pick] = True
        for row in oracle_rows(pool, pick, *scale):
            trainer.buffer.add(row)
        trainer.train_round()
        metrics = evaluate(dev, trainer.student.predict_proba(dev["query"].tolist(), texts_of(dev)))
        curve.append({"arm": name, "labels": int(labelled.sum()), **metrics})
        print(f"{name:8s} round {r + 1}: {int(labelled.sum())} labels, ndcg@10 {metrics['ndcg@10']:.4f}, spearman {metrics['spearman']:.4f}", flush=True)
    return curve


def share_to_match(sampler: list[dict], random: list[dict], metric: str) -> float | None:
    target = random[-1][metric]
    total = random[-1]["labels"]
    for point in sampler:
        if point["labels"] > 0 and point[metric] >= target:
            return point["labels"] / total
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/homedepot/train.parquet"), help="pool and bootstrap pairs")
    parser.add_argument("--dev", type=Path, default=Path("../shared/data/homedepot/dev.parquet"))
    parser.add_argument("--student", choices=["minilm", "tiny"], default="minilm")
    parser.add_argument("--bootstrap", type=int, default=300, help="human-labelled pairs of the weak student")
    parser.add_argument("--pool", type=int, default=3000)
    parser.add_argument("--budget", type=int, default=100, help="labels per round")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per round")
    parser.add_argument("--dev-queries", type=int, default=150)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)

    train = load_pairs(args.data, require_grade=True)
    dev_all = load_pairs(args.dev, require_grade=True)
    scale = (float(train["relevance"].min()), float(train["relevance"].max()))
    boot_df, rest = query_split(train, max(1, args.bootstrap // 6), rng)
    boot_df = boot_df.head(args.bootstrap)
    pool = rest.sample(n=min(args.pool, len(rest)), random_state=args.seed).reset_index(drop=True)
    dev, _ = query_split(dev_all, args.dev_queries, rng)

    t0 = time.perf_counter()
    cfg = StudentConfig.tiny() if args.student == "tiny" else StudentConfig.minilm(max_length=args.max_length)
    with torch.random.fork_rng():
        weak, _ = train_offline_frame(boot_df, human_targets(boot_df, "relevance", scale=scale), TrainConfig(epochs=1, batch_size=16, checkpoint=False, progress=False, seed=args.seed, device="cpu"), cfg, Path("/tmp/broadfast-online-bench/weak"), resume=False)

    settings = Settings(online_steps_per_round=args.steps, online_batch_size=16, online_replay_fraction=0.5, online_publish_every_s=1e12, online_lr=5e-5, home=Path("/tmp/broadfast-online-bench"))
    curves = {}
    for arm in ("random", "sampler"):
        torch.manual_seed(args.seed)
        trainer = OnlineTrainer(settings, registry=None, val=dev, device="cpu")
        trainer.student = copy.deepcopy(weak)
        trainer._make_optimizer()
        trainer.checkpoint = lambda: None  # type: ignore[method-assign]  # no disk checkpoints in the benchmark
        curves[arm] = run_arm(arm, trainer, pool, dev, args, scale)
    elapsed = time.perf_counter() - t0

    rows = []
    for i in range(args.rounds + 1):
        r, s = curves["random"][i], curves["sampler"][i]
        rows.append([r["labels"], r["ndcg@10"], s["ndcg@10"], r["spearman"], s["spearman"]])
    body = markdown_table(["labels", "random NDCG@10", "sampler NDCG@10", "random Spearman", "sampler Spearman"], rows)
    figures = []
    for metric in ("spearman", "ndcg@10"):
        share = share_to_match(curves["sampler"], curves["random"], metric)
        figures.append(f"- labels the sampler needs to reach random sampling's final {metric} ({curves['random'][-1][metric]:.4f}): "
                       + (f"**{share:.0%}** of the budget" if share is not None else "not reached within the budget (the sampler did not match random)"))
    notes = "\n".join(figures) + (
        f"\n\nStudent: {args.student} (max length {args.max_length}), weak start on {len(boot_df)} human-labelled pairs; pool {len(pool):,} pairs "
        f"of `{args.data}` (query-disjoint from the start slice); dev: {len(dev):,} pairs of {args.dev_queries} queries of `{args.dev}`. "
        f"{args.rounds} rounds × {args.budget} oracle labels, {args.steps} steps of 16 pairs per round (half replayed from the reservoir). "
        f"Oracle = human relevance spread over the neighbouring grades. Seed {args.seed}; one run, {elapsed:.0f} s."
    )
    write_result("online", "Label efficiency: hard-case sampler vs random sampling (oracle teacher)", invocation(), body, notes)


if __name__ == "__main__":
    main()
