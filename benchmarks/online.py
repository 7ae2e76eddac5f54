"""The loop learns: the online learner from a weak start, against offline training and random sampling.

Oracle teacher (a simulated annotator: the human relevance of Home Depot train pairs, spread
over the neighbouring grades with 0.1 smoothing, plus the human grade — what
``broadfast label --teacher oracle`` answers). Per seed:

1. **weak start**: a MiniLM student trained for one epoch on ``--bootstrap`` human-labelled pairs;
2. **traffic**: the rest of train (query-disjoint from the start) arrives in ``--rounds``
   windows of ``--window`` pairs; from each window an arm asks the oracle for ``--budget``
   labels and the online learner (``broadfast.training.learner.OnlineLearner``, the code ``broadfast train
   online`` runs) learns them with ``learn_many``:
   - *random*: uniformly from the window;
   - *sampler*: the stream's own admission policy (``broadfast.stream.sampler.admission_order`` over
     ``hardness_score``): hardest first for the arm's current student, ``--explore-share`` of the
     slots drawn at random, at most ``--per-query`` labels per query (the stream's defaults);
3. **offline**: ``broadfast.training.distill.train`` on the random arm's very labels, from the same weak
   start, for the same number of optimizer steps and batch size;
4. everything is measured on a query-disjoint dev slice (``--dev-queries`` queries of dev).

Figures, each as mean ± standard deviation over the seeds (and per seed):
learning (dev Spearman gained from the weak start), online ÷ offline Spearman, and the share of
labels the sampler needs to reach random sampling's final Spearman.

    python benchmarks/online.py [--seeds 0,1,2] [--rounds 6] [--budget 500] [--window 1500]
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import invocation, markdown_table, write_result  # noqa: E402
from broadfast.core.datasets import load_pairs  # noqa: E402
from broadfast.core.settings import Settings  # noqa: E402
from broadfast.core.events import normalize_query  # noqa: E402
from broadfast.stream.sampler import admission_order, hardness_score  # noqa: E402
from broadfast.model.student import pair_texts
from broadfast.training.distill import TrainConfig, prepare, train, train_offline_frame  # noqa: E402
from broadfast.training.learner import LabelRow, LearnerConfig, OnlineLearner  # noqa: E402
from broadfast.training.metrics import evaluate  # noqa: E402
from broadfast.model.student import StudentConfig  # noqa: E402
from broadfast.training.targets import Targets, human_targets, relevance_to_probs  # noqa: E402

SMOOTHING = 0.1

OFFLINE_HEAD_RATIO = TrainConfig.head_lr / TrainConfig.lr  # `train offline`'s own recipe


def query_split(df: pd.DataFrame, n_queries: int, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    queries = rng.permutation(df["query"].unique())
    mask = df["query"].isin(set(queries[:n_queries]))
    return df[mask].reset_index(drop=True), df[~mask].reset_index(drop=True)


def oracle_probs(df: pd.DataFrame, scale: tuple[float, float]) -> np.ndarray:
    return (1.0 - SMOOTHING) * relevance_to_probs(df["relevance"].to_numpy(), *scale) + SMOOTHING / 3.0


def oracle_rows(window: pd.DataFrame, idx: np.ndarray, scale: tuple[float, float]) -> list[LabelRow]:
    picked = window.iloc[idx]
    queries, texts = pair_texts(picked)
    probs = oracle_probs(picked, scale)
    return [
        LabelRow(pair_id=f"{q}|{a}", query=q, text=t, probs=[float(x) for x in p], grade=int(g), teacher_id="oracle:human-relevance(homedepot/train)")
        for q, a, t, p, g in zip(queries, picked["ad_id"], texts, probs, picked["grade"])
    ]


def evaluate_on(model: object, dev: pd.DataFrame) -> dict[str, float]:
    queries, texts = pair_texts(dev)
    return evaluate(dev, model.predict_proba(queries, texts, batch_size=128))  # type: ignore[attr-defined]


def pick_sampler(learner: OnlineLearner, window: pd.DataFrame, budget: int, args: argparse.Namespace, rng: np.random.Generator) -> np.ndarray:
    """The stream's admission policy (``broadfast.stream.sampler.admission_order``) over the window, scored by the arm's student."""
    queries, texts = pair_texts(window)
    probs = learner.predict_proba(queries, texts, batch_size=128)
    order, _ = admission_order([hardness_score(p) for p in probs], [normalize_query(q) for q in queries], args.explore_share, args.per_query, rng)
    return np.array(order[:budget])


def run_seed(seed: int, train_df: pd.DataFrame, dev_all: pd.DataFrame, args: argparse.Namespace, scale: tuple[float, float]) -> dict:
    rng = np.random.default_rng(seed)
    boot, rest = query_split(train_df, max(1, args.bootstrap // 6), rng)
    boot = boot.sample(n=min(args.bootstrap, len(boot)), random_state=seed).reset_index(drop=True)
    traffic = rest.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    dev, _ = query_split(dev_all, args.dev_queries, np.random.default_rng(1000 + seed))
    cfg = StudentConfig.minilm(max_length=args.max_length) if args.student == "minilm" else StudentConfig.tiny()
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    weak, _ = train_offline_frame(boot, human_targets(boot, "relevance", scale=scale), TrainConfig(epochs=1, batch_size=16, checkpoint=False, progress=False, seed=seed, device="cpu"), cfg, Path(f"/tmp/broadfast-online-bench/weak-{seed}"), resume=False)
    start = evaluate_on(weak, dev)
    print(f"seed {seed}: weak start spearman {start['spearman']:.4f} ndcg@10 {start['ndcg@10']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    learner_cfg = LearnerConfig(passes=args.passes, batch_size=args.batch_size, replay_fraction=args.replay_fraction, lr=args.lr, head_lr=args.lr * args.head_lr_ratio, adam_beta2=args.adam_beta2, warmup_steps=args.warmup, schedule=args.schedule, seed=seed)
    curves: dict[str, list[dict]] = {}
    labelled: dict[str, list[LabelRow]] = {}
    steps: dict[str, int] = {}
    for arm in args.arms.split(","):
        torch.manual_seed(seed)
        arm_rng = np.random.default_rng([seed, 7])
        learner = OnlineLearner(copy.deepcopy(weak), learner_cfg)
        curve = [{"labels": 0, **start}]
        rows_all: list[LabelRow] = []
        for r in range(args.rounds):
            window = traffic.iloc[r * args.window : (r + 1) * args.window].reset_index(drop=True)
            if arm == "random":
                idx = arm_rng.choice(len(window), size=min(args.budget, len(window)), replace=False)
            else:
                idx = pick_sampler(learner, window, args.budget, args, arm_rng)
            rows = oracle_rows(window, idx, scale)
            learner.learn_many(rows)
            rows_all += rows
            metrics = evaluate_on(learner, dev)
            curve.append({"labels": len(rows_all), **metrics})
            print(f"seed {seed} {arm:8s} round {r + 1}: {len(rows_all)} labels, {learner.steps} steps, spearman {metrics['spearman']:.4f}, ndcg@10 {metrics['ndcg@10']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        curves[arm], labelled[arm], steps[arm] = curve, rows_all, learner.steps

    # offline: the random arm's labels (or the only arm run), same weak start, same number of steps of the same size
    base = "random" if "random" in labelled else next(iter(labelled))
    rows = labelled[base]
    frame = pd.DataFrame({"query": [r.query for r in rows], "title": [r.text for r in rows], "text": ""})
    targets = Targets(np.array([r.probs for r in rows], dtype=np.float32), np.array([r.grade for r in rows], dtype=np.int64), None, np.zeros(len(rows), dtype=bool), "oracle")
    student = copy.deepcopy(weak)
    ts = prepare(student, frame, targets)
    n_batches = math.ceil(len(rows) / args.batch_size)
    epochs = math.ceil(steps[base] / n_batches)
    torch.manual_seed(seed)
    train(student, ts, TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=args.lr, head_lr=args.lr * OFFLINE_HEAD_RATIO, max_steps=steps[base], checkpoint=False, progress=False, seed=seed, device="cpu"), f"/tmp/broadfast-online-bench/offline-{seed}", resume=False)
    offline = evaluate_on(student, dev)
    print(f"seed {seed} offline ({base} arm's labels): {len(rows)} labels, {steps[base]} steps ({epochs} epochs), spearman {offline['spearman']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return {"seed": seed, "start": start, "curves": curves, "steps": steps, "offline": offline, "dev_pairs": len(dev), "seconds": time.perf_counter() - t0}


def share_to_match(sampler: list[dict], random: list[dict], metric: str = "spearman") -> float | None:
    target, total = random[-1][metric], random[-1]["labels"]
    for point in sampler:
        if point["labels"] > 0 and point[metric] >= target:
            return point["labels"] / total
    return None


def mean_sd(values: list[float]) -> str:
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if not len(v):
        return "—"
    return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/homedepot/train.parquet"), help="traffic and weak-start pairs")
    parser.add_argument("--dev", type=Path, default=Path("../shared/data/homedepot/dev.parquet"))
    parser.add_argument("--student", choices=["minilm", "tiny"], default="minilm")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--bootstrap", type=int, default=300, help="human-labelled pairs of the weak start")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--budget", type=int, default=500, help="oracle labels per round")
    parser.add_argument("--window", type=int, default=1500, help="traffic pairs per round the arms pick from")
    parser.add_argument("--explore-share", type=float, default=Settings().stream.stream_explore_share, help="sampler arm: share of slots drawn at random [BROADFAST_STREAM_EXPLORE_SHARE]")
    parser.add_argument("--per-query", type=int, default=Settings().stream.stream_per_query_cap, help="sampler arm: most labels per query per window [BROADFAST_STREAM_PER_QUERY_CAP]")
    parser.add_argument("--passes", type=int, default=LearnerConfig.passes)
    parser.add_argument("--batch-size", type=int, default=LearnerConfig.batch_size)
    parser.add_argument("--replay-fraction", type=float, default=LearnerConfig.replay_fraction)
    parser.add_argument("--lr", type=float, default=LearnerConfig.lr)
    parser.add_argument("--head-lr-ratio", type=float, default=Settings().training.online_head_lr_ratio, help="online learner: learning rate of the extractor and head as a multiple of --lr [BROADFAST_ONLINE_HEAD_LR_RATIO]")
    parser.add_argument("--adam-beta2", type=float, default=Settings().training.online_adam_beta2, help="online learner: AdamW's second-moment decay [BROADFAST_ONLINE_ADAM_BETA2]")
    parser.add_argument("--warmup", type=int, default=LearnerConfig.warmup_steps)
    parser.add_argument("--schedule", choices=["constant", "inverse_sqrt"], default=LearnerConfig.schedule)
    parser.add_argument("--dev-queries", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arms", default="random,sampler", help="which arms run (a pilot may skip the sampler: 'random')")
    parser.add_argument("--result", default="online", help="results file name under benchmarks/results/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train_df = load_pairs(args.data, require_grade=True)
    dev_all = load_pairs(args.dev, require_grade=True)
    scale = (float(train_df["relevance"].min()), float(train_df["relevance"].max()))
    runs = [run_seed(int(s), train_df, dev_all, args, scale) for s in args.seeds.split(",")]

    for r in runs:  # an arm left out (--arms) reads as "—"
        for arm in ("random", "sampler"):
            r["curves"].setdefault(arm, [{"labels": p["labels"], "spearman": float("nan"), "ndcg@10": float("nan")} for p in next(iter(r["curves"].values()))])
            r["steps"].setdefault(arm, 0)
    headers = ["labels"] + [f"{arm} Spearman, seed {r['seed']}" for arm in ("random", "sampler") for r in runs]
    curve_rows = []
    for i in range(args.rounds + 1):
        curve_rows.append([runs[0]["curves"]["random"][i]["labels"]] + [r["curves"][arm][i]["spearman"] for arm in ("random", "sampler") for r in runs])
    curve_table = markdown_table(headers, curve_rows)

    per_seed, gains, sampler_gains, ratios, shares = [], [], [], [], []
    for r in runs:
        start, rnd, smp, off = r["start"]["spearman"], r["curves"]["random"][-1], r["curves"]["sampler"][-1], r["offline"]
        share = share_to_match(r["curves"]["sampler"], r["curves"]["random"])
        gains.append(rnd["spearman"] - start)
        sampler_gains.append(smp["spearman"] - start)
        ratios.append(rnd["spearman"] / off["spearman"])
        shares.append(share)
        per_seed.append([r["seed"], start, rnd["spearman"], smp["spearman"], off["spearman"], rnd["ndcg@10"], smp["ndcg@10"], off["ndcg@10"], rnd["spearman"] / off["spearman"], "not reached" if share is None else f"{share:.0%}", r["steps"]["random"], f"{r['seconds']:.0f} s"])
    seed_table = markdown_table(
        ["seed", "weak start", "online random", "online sampler", "offline (same labels, steps)", "NDCG@10 random", "NDCG@10 sampler", "NDCG@10 offline", "online ÷ offline", "sampler labels to match random", "steps", "time"], per_seed
    )
    summary = markdown_table(
        ["figure (dev Spearman)", f"mean ± sd over {len(runs)} seeds", "aim"],
        [
            ["learning: online (random labels) − weak start", mean_sd(gains), "≥ 0.25"],
            ["learning: online (sampler labels) − weak start", mean_sd(sampler_gains), "≥ 0.25"],
            ["online ÷ offline, same labels and steps", mean_sd(ratios), "≥ 0.95"],
            ["share of labels the sampler needs to match random's final", mean_sd([s for s in shares if s is not None]) + (f" ({sum(s is None for s in shares)} seed(s) never matched)" if any(s is None for s in shares) else ""), "≤ 0.50"],
        ],
    )
    n_labels = args.rounds * args.budget
    notes = (
        f"Per seed: weak start on {args.bootstrap} human-labelled pairs (1 epoch); {args.rounds} rounds × {args.budget} oracle labels = {n_labels:,} labels "
        f"picked from windows of {args.window:,} traffic pairs of `{args.data}` (query-disjoint from the start; the sampler arm: hardest first, "
        f"{args.explore_share:.0%} of slots random, at most {args.per_query} per query per window); learner: {args.passes} passes per label, "
        f"batch {args.batch_size} ({args.replay_fraction:.0%} replayed), lr {args.lr:g} (extractor and head ×{args.head_lr_ratio:g}, AdamW β2 {args.adam_beta2:g}; {args.schedule} after {args.warmup} warm-up steps); "
        f"offline: `train offline`'s recipe (extractor and head ×{OFFLINE_HEAD_RATIO:g}, linear warm-up and decay); "
        f"dev: {args.dev_queries} queries of `{args.dev}` ({runs[0]['dev_pairs']:,} pairs for seed {runs[0]['seed']}). Student {args.student}, max length {args.max_length}, "
        f"{args.threads} threads. The oracle is a simulation (human judgements), not a model."
    )
    body = "## Summary\n\n" + summary + "\n\n## Per seed\n\n" + seed_table + "\n\n## Learning curves (dev Spearman)\n\n" + curve_table
    write_result(args.result, "The loop learns: online learner vs offline and sampler vs random (oracle teacher)", invocation(), body, notes)


if __name__ == "__main__":
    main()
