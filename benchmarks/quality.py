"""Relevance quality on the human-labelled sets: TF-IDF baselines, a plain cross-encoder, the LRKD student.

Trains on a set's ``train.parquet`` with the human judgements as the teacher (graded
relevance spread over the two neighbouring grades; CE to the 3-level grade) and
evaluates on its ``dev.parquet``: NDCG@10 per query (gain 2^(relevance−1) − 1 on the
set's own scale), Spearman(score, relevance), macro-F1 over the three grades.
With human grades only there are no rationales, so the LRKD student's alignment term is
off; its extractor still runs (this row measures the architecture, not the alignment).

Also measures training throughput (pairs/s) of the project's loop (pre-tokenised,
length-bucketed batches; bf16 autocast on GPU) next to a naive loop that tokenises
each random batch at every step in fp32, same model, same batch size, same run.

    python benchmarks/quality.py --sets homedepot,crowdflower                  # GPU: full run, 3 epochs
    python benchmarks/quality.py --sets crowdflower,homedepot --epochs homedepot=2,crowdflower=3 --threads 2   # 2-core CPU: ~1.5 h
    python benchmarks/quality.py --device cpu --epochs 1 --train-limit 4000   # a quick look (far below the reference)
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd
import torch

from benchmarks.common import invocation, markdown_table, write_result
from broadfast.core.datasets import load_pairs
from broadfast.model.student import pair_texts
from broadfast.training.distill import TrainConfig, prepare, train
from broadfast.training.losses import LossConfig, lrkd_loss
from broadfast.training.metrics import evaluate
from broadfast.model.student import StudentConfig, build_student
from broadfast.training.targets import human_targets

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.quality")
SCALES = {"homedepot": (1.0, 3.0), "crowdflower": (1.0, 4.0)}
REFERENCE = {"homedepot": {"spearman": 0.522, "ndcg@10": 0.906}, "crowdflower": {"spearman": 0.498}}


# -- TF-IDF baselines --------------------------------------------------------------------
def _tfidf_features(vectorizers, queries: list[str], texts: list[str]) -> np.ndarray:
    feats = []
    for vec in vectorizers:
        q, t = vec.transform(queries), vec.transform(texts)
        feats.append(np.asarray(q.multiply(t).sum(1)).ravel())  # rows are L2-normalised: cosine
    qtok = [set(x.lower().split()) for x in queries]
    ttok = [set(x.lower().split()) for x in texts]
    feats.append(np.array([len(a & b) / max(1, len(a)) for a, b in zip(qtok, ttok)]))
    feats.append(np.array([len(a) for a in qtok], dtype=float))
    return np.stack(feats, 1)


def tfidf_rows(train_df: pd.DataFrame, dev_df: pd.DataFrame) -> list[tuple[str, np.ndarray, float]]:
    """(name, dev probabilities, seconds) of TF-IDF cosine and a logistic regression on TF-IDF features."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    tq, tt = pair_texts(train_df)
    dq, dt = pair_texts(dev_df)
    word = TfidfVectorizer(sublinear_tf=True).fit(tq + tt)
    char = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True, min_df=2).fit(tq + tt)
    xtr, xdev = _tfidf_features([word, char], tq, tt), _tfidf_features([word, char], dq, dt)
    # cosine alone: score = cosine; grades cut at the train label mix's quantiles
    cos_tr, cos_dev = xtr[:, 0], xdev[:, 0]
    mix = np.bincount(train_df["grade"], minlength=3) / len(train_df)
    cuts = np.quantile(cos_tr, [mix[0], mix[0] + mix[1]])
    grade = np.digitize(cos_dev, cuts)
    cos_probs = np.zeros((len(dev_df), 3))
    # probs whose score P(exact)+½P(partial) equals the cosine (for ranking) and whose argmax is the cut grade
    cos_probs[np.arange(len(dev_df)), grade] = 1.0
    cos_probs = 0.5 * cos_probs + 0.5 * np.stack([1 - cos_dev, np.zeros_like(cos_dev), cos_dev], 1)
    rows = [("TF-IDF cosine (query vs title + text)", cos_probs, time.perf_counter() - t0)]
    t1 = time.perf_counter()
    lr = LogisticRegression(max_iter=2000, C=1.0).fit(xtr, train_df["grade"])
    rows.append(("TF-IDF features + logistic regression", lr.predict_proba(xdev), time.perf_counter() - t1))
    return rows


# -- throughput: the project's loop vs a naive one ------------------------------------------
def naive_steps(student, df: pd.DataFrame, targets, steps: int, batch_size: int, max_length: int, loss_cfg: LossConfig, warmup: int = 2) -> tuple[float, int]:
    """Tokenise a random batch at every step (padding to its longest), fp32. Returns (seconds, pairs) after ``warmup`` untimed steps."""
    opt = torch.optim.AdamW(student.parameters(), lr=5e-5)
    queries, texts = pair_texts(df)
    rng = np.random.default_rng(0)
    dev = student.device
    student.train()
    t0 = time.perf_counter()
    pairs = 0
    for step in range(warmup + steps):
        if step == warmup:
            t0, pairs = time.perf_counter(), 0
        idx = rng.choice(len(df), batch_size, replace=False)
        enc = student.tokenizer([queries[i] for i in idx], [texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(dev)
        out = student(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        tp = torch.from_numpy(targets.teacher_probs[idx]).to(dev)
        gr = torch.from_numpy(targets.grades[idx]).to(dev)
        loss, _ = lrkd_loss(out, tp, gr, None, None, loss_cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pairs += len(idx)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, pairs


def throughput(df: pd.DataFrame, args: argparse.Namespace, workdir: Path) -> list[list[object]]:
    cfg_student = StudentConfig.minilm(extractor="none", max_length=args.max_length)
    targets = human_targets(df, "relevance")
    rows = []
    torch.manual_seed(0)
    student = build_student(cfg_student, args.device)
    secs, pairs = naive_steps(student, df, targets, args.throughput_steps, args.batch_size, args.max_length, LossConfig())
    rows.append(["naive: tokenise per step, random batches, fp32", pairs, secs, pairs / secs, 1.0])
    torch.manual_seed(0)
    student = build_student(cfg_student, args.device)
    t0 = time.perf_counter()
    ts = prepare(student, df, targets)
    tok = time.perf_counter() - t0
    warm = TrainConfig(epochs=1, batch_size=args.batch_size, max_steps=2, checkpoint=False, progress=False, device=args.device)
    train(student, ts, warm, workdir / "throughput", resume=False)  # the same two untimed warm-up steps as the naive loop
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, max_steps=args.throughput_steps, checkpoint=False, progress=False, device=args.device, seed=1)
    result = train(student, ts, cfg, workdir / "throughput", resume=False)
    base = rows[0][3]
    amp = "bf16 autocast" if torch.device(args.device).type == "cuda" else "fp32 (no autocast on CPU)"
    rows.append([f"broadfast: pre-tokenised, length-bucketed, {amp}", result.pairs, result.seconds, result.pairs_per_s, result.pairs_per_s / base])
    rows.append([f"(one-off pre-tokenisation of all {len(df):,} train pairs)", len(df), tok, len(df) / tok, "—"])
    return rows


# -- the student rows -------------------------------------------------------------------------
def student_row(name: str, extractor: str, train_df: pd.DataFrame, dev_df: pd.DataFrame, scale, args, workdir: Path):
    torch.manual_seed(args.seed)
    cfg_student = StudentConfig.minilm(extractor=extractor, max_length=args.max_length)
    student = build_student(cfg_student, args.device)
    targets = human_targets(train_df, "relevance", scale=scale)
    ts = prepare(student, train_df, targets)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, checkpoint=False, progress=True, device=args.device)
    q, t = pair_texts(dev_df)

    def on_epoch_end(model, epoch: int) -> dict[str, float]:  # dev metrics after each epoch, for the notes
        return evaluate(dev_df, model.predict_proba(q, t, batch_size=128))

    result = train(student, ts, cfg, workdir / name.replace(" ", "_"), resume=False, on_epoch_end=on_epoch_end if args.epochs > 1 else None)
    t0 = time.perf_counter()
    probs = student.predict_proba(q, t, batch_size=128)
    infer = time.perf_counter() - t0
    counts = student.parameter_counts()
    curve = " → ".join(f"{m['spearman']:.3f}" for m in result.epoch_metrics)
    note = (
        f"train {result.seconds:.0f}s ({result.pairs_per_s:.0f} pairs/s), dev scoring {len(dev_df) / infer:.0f} pairs/s; extractor {counts['extractor']:,} params"
        + (f"; dev Spearman by epoch {curve}" if curve else "")
    )
    return name, probs, note


def per_set(value: str, name: str) -> int:
    """``"3"`` → 3 for every set; ``"homedepot=2,crowdflower=3"`` → the named set's value."""
    if "=" not in value:
        return int(value)
    pairs = dict(part.split("=", 1) for part in value.split(","))
    if name not in pairs:
        raise SystemExit(f"no value for set {name!r} in {value!r}")
    return int(pairs[name])


def run_set(name: str, args: argparse.Namespace, workdir: Path) -> tuple[str, list[list[object]] | None]:
    args = argparse.Namespace(**{**vars(args), "epochs": per_set(args.epochs, name), "max_length": per_set(args.max_length, name)})
    root = Path(args.data_root)
    train_df = load_pairs(root / name / "train.parquet", require_grade=True)
    dev_df = load_pairs(root / name / "dev.parquet", require_grade=True)
    full_train = len(train_df)
    if args.train_limit and args.train_limit < len(train_df):
        train_df = train_df.sample(args.train_limit, random_state=args.seed).reset_index(drop=True)
    if args.dev_limit and args.dev_limit < len(dev_df):
        keep = dev_df["query"].drop_duplicates().sample(frac=1.0, random_state=args.seed)
        counts = dev_df.groupby("query").size()[keep].cumsum()
        dev_df = dev_df[dev_df["query"].isin(counts[counts <= args.dev_limit].index)].reset_index(drop=True)
    scale = SCALES[name]
    log.info("%s: train on %d of %d pairs, evaluate on %d dev pairs", name, len(train_df), full_train, len(dev_df))
    results: list[tuple[str, np.ndarray, str]] = []
    rows = set(args.rows.split(","))
    if "tfidf" in rows:
        for row_name, probs, secs in tfidf_rows(train_df, dev_df):
            results.append((row_name, probs, f"{secs:.1f}s"))
    if "plain" in rows:
        results.append(student_row("MiniLM cross-encoder, no extractor (plain)", "none", train_df, dev_df, scale, args, workdir))
    if "lrkd" in rows:
        results.append(student_row("LRKD student (MLP extractor, K=3; no rationales: alignment off)", "mlp", train_df, dev_df, scale, args, workdir))
    table = []
    for row_name, probs, note in results:
        m = evaluate(dev_df, probs)
        table.append([row_name, round(m["ndcg@10"], 3), round(m["spearman"], 3), round(m["macro_f1"], 3), note])
    ref = REFERENCE[name]
    ref_text = ", ".join(f"{k} {v}" for k, v in ref.items())
    header = (
        f"## {name}\n\ntrain: {len(train_df):,} of {full_train:,} pairs · dev: {len(dev_df):,} pairs, {dev_df['query'].nunique():,} queries · "
        f"epochs {args.epochs} · max_length {args.max_length} · batch {args.batch_size} · lr {args.lr}\n"
        f"Reference (plain MiniLM regressed on relevance, 3 epochs, full train, H100): {ref_text}.\n\n"
    )
    md = header + markdown_table(["model", "NDCG@10", "Spearman", "macro-F1", "notes"], table)
    print(md, flush=True)
    if name != args.throughput_set or args.throughput_steps <= 0:
        return md, None
    return md, (throughput(train_df, args, workdir), args.max_length)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", default="homedepot,crowdflower")
    ap.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--epochs", default="3", help="Epochs: N for every set, or per set as homedepot=2,crowdflower=3.")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4, help="Encoder learning rate.")
    ap.add_argument("--max-length", default="homedepot=64,crowdflower=128", help="Token limit of a pair: N, or per set as homedepot=64,crowdflower=128.")
    ap.add_argument("--train-limit", type=int, default=0, help="Train on a random sample of N pairs (0: all).")
    ap.add_argument("--dev-limit", type=int, default=0, help="Evaluate on whole queries up to N dev pairs (0: all).")
    ap.add_argument("--rows", default="tfidf,plain,lrkd", help="Which rows to run (comma-separated subset of tfidf,plain,lrkd).")
    ap.add_argument("--throughput-set", default="homedepot")
    ap.add_argument("--throughput-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="Torch CPU threads.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--result", default="quality", help="Name of the results file (benchmarks/results/<name>.md).")
    ap.add_argument("--card", default=None, help="Name of the machine for the table (default: detected).")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    import tempfile

    sections: list[str] = []
    tp_rows = None
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bf-quality-") as tmp:
        for name in args.sets.split(","):
            md, tp = run_set(name.strip(), args, Path(tmp))
            sections.append(md)
            tp_rows = tp_rows or tp
            _write(args, sections, tp_rows, t0)  # after each set, so a long run keeps what it finished


def _write(args: argparse.Namespace, sections: list[str], tp: tuple[list[list[object]], int] | None, t0: float) -> None:
    body = "\n\n".join(sections)
    if tp:
        tp_rows, tp_length = tp
        body += (
            f"\n\n## Training throughput ({args.throughput_set}, MiniLM, no extractor, batch {args.batch_size}, max_length {tp_length}, "
            f"{args.throughput_steps} steps each)\n\n" + markdown_table(["loop", "pairs", "seconds", "pairs/s", "ratio vs naive"], tp_rows)
        )
    card = args.card or ("GPU " + torch.cuda.get_device_name(0) if torch.device(args.device).type == "cuda" else f"CPU ({args.threads} torch thread(s))")
    notes = (
        f"Card: {card}. Whole run: {time.perf_counter() - t0:.0f}s. "
        "Teacher = the human judgements (relevance spread over the two neighbouring grades, plus CE to the grade); "
        "no LLM rationales, so the LRKD row's alignment loss is off and the row measures the extractor architecture only. "
        "TF-IDF cosine: score = ½·grade-cut + ½·cosine (ranking by cosine), grades cut at the train label mix. "
        "CPU figures come from a shared 2-core machine: absolute times are noisy; compare rows of the same run."
    )
    write_result(args.result, "Relevance quality: TF-IDF vs plain cross-encoder vs LRKD student", invocation(), body, notes)


if __name__ == "__main__":
    main()
