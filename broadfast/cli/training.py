"""Command-line commands of broadfast/training/ (registered on the `broadfast` group in broadfast/cli/main.py).

Keep imports of heavy libraries inside the command functions so `broadfast --help` stays fast.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click

from broadfast.core.logs import command_settings
from broadfast.core.errors import ConfigError

log = logging.getLogger(__name__)


def _torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


@click.group()
def train() -> None:
    """Distil the student: offline from a file, or online from the labels topic."""


@train.command("offline")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Parquet of pairs, as the data sets lay them out (query, product_id, title[, description, grade, relevance]).")
@click.option("--labels", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Teacher labels parquet (see docs/student.md); without it the data's human judgements are the targets.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Model folder to write (and checkpoint into).")
@click.option("--targets", type=click.Choice(["relevance", "grade"]), default="relevance", show_default=True, help="Without --labels: soft targets from the graded relevance, or smoothed one-hot grades.")
@click.option("--extractor", type=click.Choice(["mlp", "attention", "none"]), default="mlp", show_default=True, help="Latent reasoning extractor ('none' = plain cross-encoder).")
@click.option("--perspectives", "n_perspectives", type=int, default=3, show_default=True, help="K: latent vectors, one per teacher perspective.")
@click.option("--latent-dim", type=int, default=128, show_default=True)
@click.option("--max-length", type=int, default=128, show_default=True, help="Tokens per (query, ad) pair.")
@click.option("--epochs", type=int, default=3, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True, help="Encoder learning rate (the recipe benchmarks/quality.py measured).")
@click.option("--head-lr", type=float, default=5e-4, show_default=True, help="Learning rate of the extractor and head.")
@click.option("--kd-weight", type=float, default=1.0, show_default=True)
@click.option("--ce-weight", type=float, default=0.5, show_default=True, help="Cross-entropy to the human grade, where the data has one.")
@click.option("--align-weight", type=float, default=0.5, show_default=True, help="λ of the latent–rationale alignment loss (0: off).")
@click.option("--align-kind", type=click.Choice(["cosine", "mse"]), default="cosine", show_default=True)
@click.option("--temperature", type=float, default=2.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--limit", type=int, default=None, help="Train on the first N rows only (after the labels join).")
@click.option("--eval", "eval_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Parquet to evaluate on after every epoch (the per-epoch metrics and the final ones go into training.json; the final ones into the registry).")
@click.option("--device", default=None, help="Torch device (default: BROADFAST_TRAIN_DEVICE, else cuda when available).")
@click.option("--checkpoint-every", type=int, default=500, show_default=True, help="Steps between checkpoints (also at every epoch end).")
@click.option("--resume/--no-resume", default=True, show_default=True, help="Continue from <out>/checkpoint when it is there.")
@click.option("--keep-checkpoint", is_flag=True, help="Keep <out>/checkpoint after the run.")
@click.option("--from-scratch-tiny", is_flag=True, hidden=True, help="A tiny random encoder instead of MiniLM (tests).")
@click.option("--from-student", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Distil a smaller student from this trained student folder: its grade probabilities on the pairs are the soft targets (with the human grade where the data has one); needs --layers.")
@click.option("--layers", type=click.IntRange(min=1), default=None, help="With --from-student: encoder layers of the new student, fewer than the source's (it starts from the source's bottom N layers).")
def train_offline(data: Path, labels: Path | None, out: Path, targets: str, extractor: str, n_perspectives: int, latent_dim: int, max_length: int, epochs: int,
                  batch_size: int, lr: float, head_lr: float, kd_weight: float, ce_weight: float, align_weight: float, align_kind: str, temperature: float,
                  seed: int, limit: int | None, eval_path: Path | None, device: str | None, checkpoint_every: int, resume: bool, keep_checkpoint: bool,
                  from_scratch_tiny: bool, from_student: Path | None, layers: int | None) -> None:  # fmt: skip
    """Distil the student from a parquet file of pairs (and teacher labels), or a smaller
    student from a trained one (--from-student DIR --layers N)."""
    _check_shrink_options(from_student, layers, labels)
    settings = command_settings()
    _torch_threads(settings.torch_threads)
    from broadfast.core.datasets import load_pairs
    from broadfast.training.distill import TrainConfig, train_offline_frame
    from broadfast.training.losses import LossConfig
    from broadfast.model.registry import sha256_file
    from broadfast.model.student import Student, StudentConfig
    from broadfast.training.targets import human_targets, label_targets, read_labels

    df = load_pairs(data)
    initial: Student | None = None
    shrunk_from: dict[str, Any] | None = None
    if from_student is not None and layers is not None:
        df = df.iloc[:limit].reset_index(drop=True) if limit is not None else df  # label only the pairs trained on
        initial, tgt, shrunk_from = _shrink(from_student, layers, df, device or settings.training.train_device)
        student_cfg = initial.config
    else:
        student_kw: dict[str, Any] = {"extractor": extractor, "n_perspectives": n_perspectives, "latent_dim": latent_dim, "max_length": max_length}
        student_cfg = StudentConfig.tiny(**student_kw) if from_scratch_tiny else StudentConfig.minilm(**student_kw)
        if labels is not None:
            df, tgt = label_targets(df, read_labels(labels), n_perspectives, student_cfg.rationale_dim)
        else:
            tgt = human_targets(df, targets)
        if limit is not None:
            df = df.iloc[:limit].reset_index(drop=True)
            tgt = _cut(tgt, limit)
    cfg = TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, head_lr=head_lr, seed=seed, checkpoint_every=checkpoint_every,
        device=device or settings.training.train_device,
        loss=LossConfig(kd_weight=kd_weight, ce_weight=ce_weight, align_weight=align_weight, temperature=temperature, align_kind=align_kind),  # type: ignore[arg-type]
    )  # fmt: skip
    trained_on = {"data": str(data), "data_sha256": sha256_file(data), "rows": len(df), "targets": tgt.source}
    if labels is not None:
        trained_on |= {"labels": str(labels), "labels_sha256": sha256_file(labels)}
    if shrunk_from is not None:
        trained_on["from_student"] = shrunk_from
    eval_df = load_pairs(eval_path, require_grade=True) if eval_path is not None else None
    _, report = train_offline_frame(
        df, tgt, cfg, student_cfg, out, resume=resume, keep_checkpoint=keep_checkpoint, trained_on=trained_on, eval_df=eval_df, student=initial,
    )  # fmt: skip
    summary = {k: report[k] for k in ("steps", "seconds", "pairs_per_s", "last_loss", "metrics")}
    click.echo(json.dumps({"model": str(out), **summary}, indent=2))


_ARCHITECTURE_OPTIONS = ("targets", "extractor", "n_perspectives", "latent_dim", "max_length", "from_scratch_tiny")


def _check_shrink_options(from_student: Path | None, layers: int | None, labels: Path | None) -> None:
    """Usage errors (exit 2) of --from-student / --layers, before anything heavy is loaded."""
    from click.core import ParameterSource

    from broadfast.model.errors import CheckpointError
    from broadfast.model.student import read_config

    if layers is not None and from_student is None:
        raise click.UsageError("--layers needs --from-student DIR (the trained student to shrink)")
    if from_student is None:
        return
    if layers is None:
        raise click.UsageError("--from-student needs --layers N (how many encoder layers the new student keeps)")
    if labels is not None:
        raise click.UsageError("--from-student takes its targets from the source student; it cannot be combined with --labels")
    ctx = click.get_current_context()
    given = [p.opts[0] for p in ctx.command.params if p.name in _ARCHITECTURE_OPTIONS and ctx.get_parameter_source(p.name) not in (ParameterSource.DEFAULT, None)]
    if given:
        raise click.UsageError(f"with --from-student the architecture and targets come from the source student: drop {', '.join(given)}")
    try:
        source_layers = read_config(from_student).layers
    except (CheckpointError, KeyError, TypeError, ValueError) as exc:
        raise click.BadParameter(f"{from_student} is not a student model folder: {exc}", param_hint="--from-student") from None
    if layers >= source_layers:
        raise click.BadParameter(f"{layers} is not fewer than the source student's {source_layers} encoder layers", param_hint="--layers")


def _shrink(source_dir: Path, layers: int, df: Any, device: str | None) -> tuple[Any, Any, dict[str, Any]]:
    """The shrunk student, the source's soft labels on ``df`` and the lineage record."""
    import torch

    from broadfast.training.shrink import lineage, shrink_student, student_targets
    from broadfast.model.student import load_student

    source = load_student(source_dir, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    small, kept = shrink_student(source, layers)
    log.info("shrinking %s: %d → %d encoder layers, keeping source layers %s", source_dir, source.config.layers, layers, kept)
    tgt = student_targets(source, df)
    record = lineage(source_dir, source, kept)
    del source
    return small, tgt, record


def _cut(tgt: Any, n: int) -> Any:
    from broadfast.training.targets import Targets

    return Targets(tgt.teacher_probs[:n], tgt.grades[:n], None if tgt.rationale is None else tgt.rationale[:n], tgt.has_rationale[:n], tgt.source)


@train.command("online")
@click.option("--max-rounds", type=click.IntRange(min=1), default=None, help="Stop after this many training rounds (default: run until stopped).")
@click.option("--val-data", type=click.Path(dir_okay=False, path_type=Path), multiple=True,
              help="Human-graded pairs for the fixed validation slice; repeat it for several data sets (their held-out queries, pooled) [BROADFAST_DATA].")
def train_online(max_rounds: int | None, val_data: tuple[Path, ...]) -> None:
    """Distil continuously from relevance.labels and publish gated versions.

    \b
    Trains in rounds: every fresh label BROADFAST_ONLINE_PASSES times, mixed with labels
    replayed from a reservoir, with the offline recipe's losses (soft teacher
    distribution, the grade where the label has one, weighted by the teacher's
    confidence). Publishes a new version (ModelPublished → hot swap) only when, on a
    fixed query-disjoint validation slice, it is at least the best champion's score minus
    BROADFAST_ONLINE_GATE_TOLERANCE; every verdict gives its bootstrap interval. Label
    offsets are committed once the labels are inside a published or checkpointed model;
    a restart resumes from the checkpoint. See docs/online.md.
    """
    import signal
    import threading

    from broadfast.training.online import run_online

    settings = command_settings()
    _torch_threads(settings.torch_threads)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    trainer = run_online(settings, stop=stop, max_rounds=max_rounds, val_data=list(val_data) or None)
    click.echo(f"online trainer stopped after {trainer.rounds} rounds, {trainer.steps} steps, {trainer.labels_trained} labels; live version {trainer.live_version}")


@click.command()
@click.option("--model", type=click.Path(file_okay=False, path_type=Path), required=True, help="A model folder (from `train offline` or the registry).")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Parquet of pairs (query, product_id, title[, description]).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Parquet to write: the input rows plus score, p_irrelevant, p_partial, p_exact.")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--device", default=None, help="Torch device (default: BROADFAST_TRAIN_DEVICE, else cuda when available).")
def predict(model: Path, data: Path, out: Path, batch_size: int, device: str | None) -> None:
    """Batch-score a parquet file of pairs (adds score and the grade probabilities)."""
    settings = command_settings()
    _torch_threads(settings.torch_threads)
    import torch

    from broadfast.serving.predict import predict_file

    dev = device or settings.training.train_device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = predict_file(model, data, out, batch_size=batch_size, device=dev, backend=settings.serving.serve_backend, threads=settings.torch_threads)
    click.echo(f"wrote {len(result)} scored pairs to {out}")


@click.group()
def registry() -> None:
    """Model versions: list, show, publish."""


@registry.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the manifests as JSON.")
def registry_list(as_json: bool) -> None:
    """List model versions (oldest first; * marks the champion; teachers: who labelled the training data, with label counts)."""
    from broadfast.model.registry import Registry, teachers_column

    reg = Registry(command_settings())
    manifests = reg.manifests()
    if as_json:
        click.echo(json.dumps([json.loads(m.to_json()) for m in manifests], indent=2))
        return
    if not manifests:
        click.echo(f"no versions of {reg.name!r} in the registry")
        return
    champion = reg.champion()
    import datetime as dt

    for m in manifests:
        when = dt.datetime.fromtimestamp(m.created_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(m.metrics.items()))
        mark = "*" if m.version == champion else " "
        click.echo(f"{mark} {m.version}  {when}  parent={m.parent or '-'}  sha256={m.sha256[:12]}  teachers={teachers_column(m.trained_on)}  {metrics}")


@registry.command("show")
@click.argument("version")
@click.option("--json", "as_json", is_flag=True, help='Print the whole manifest as JSON (+ "champion": true/false).')
def registry_show(version: str, as_json: bool) -> None:
    """Show one version: metrics, what it was trained on, and which teachers labelled its data (ids and counts)."""
    from broadfast.model.registry import Registry, describe

    reg = Registry(command_settings())
    found = reg.show(version)
    champion = reg.champion() == version
    if as_json:
        manifest = json.loads(found.to_json())
        manifest["champion"] = champion
        click.echo(json.dumps(manifest, indent=2, sort_keys=True))
        return
    click.echo(describe(found, champion=champion))


@registry.command("publish")
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--parent", default=None, help="The version this one was trained from.")
@click.option("--metrics", default=None, help='JSON object of metrics (default: those in the folder\'s training.json), e.g. \'{"spearman": 0.52}\'.')
@click.option("--champion", is_flag=True, help="Make it the champion (the first version always is).")
def registry_publish(model_dir: Path, parent: str | None, metrics: str | None, champion: bool) -> None:
    """Register a model folder as a new version and announce it on relevance.models."""
    from broadfast.model.registry import Registry

    parsed = None
    if metrics is not None:
        try:
            parsed = json.loads(metrics)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--metrics is not valid JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise ConfigError("--metrics must be a JSON object of name → number")
    manifest = Registry(command_settings()).publish(model_dir, parent=parent, metrics=parsed, champion=champion)
    click.echo(json.dumps({"version": manifest.version, "uri": manifest.uri, "sha256": manifest.sha256}, indent=2))
