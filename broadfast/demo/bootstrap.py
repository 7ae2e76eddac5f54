"""The demo's set-up before traffic: a first student, the Feast repo, a fresh trainer.

The first student is the registry's champion, or one trained on a small human-labelled slice
(the bottom layers of the encoder, one epoch) and measured exactly as the online trainer's gate
measures every later version, so the demo's "first" figure is comparable with the rest.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from broadfast.core.errors import BroadfastError
from broadfast.core.settings import Settings
from broadfast.demo.report import version_quality
from broadfast.demo.supervisor import run_step

log = logging.getLogger(__name__)


def forget_trainer_state(home: Path) -> None:
    """The embedded broker starts empty, so an earlier run's trainer checkpoint (label offsets of a
    topic that no longer exists) would skip this run's first labels: start the trainer afresh. The
    registry is kept, and its champion is this run's first student."""
    checkpoint = home / "trainer"
    if checkpoint.exists():
        log.info("removing the trainer state of an earlier demo run (%s): the embedded broker starts empty", checkpoint)
        shutil.rmtree(checkpoint)


def set_up_features(env: dict[str, str]) -> None:
    """Register the Feast repo and load the ad attributes, so the stream can push its counters."""
    for step in (["features", "apply"], ["features", "materialize"]):
        proc = run_step(env, *step)
        if proc.returncode != 0:
            raise BroadfastError(f"`broadfast {' '.join(step)}` failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        log.info("broadfast %s: done", " ".join(step))


def bootstrap_student(
    settings: Settings, data: Path, val_files: list[Path], out: Path, *, student: str, layers: int | None, pairs: int, seed: int, progress: bool
) -> tuple[str, dict[str, Any]]:
    """The registry's champion, or a first ``student`` ("minilm" or "tiny") of ``layers`` encoder
    layers trained on ``pairs`` human-labelled pairs of ``data`` (its train split where there is one).

    Returns its version and its quality (validation figures on the online trainer's slice).
    """
    from broadfast.model.registry import Registry

    registry = Registry(settings)
    champion = registry.champion()
    if champion is not None:
        log.info("serving the registry's champion %s", champion)
        manifest = registry.show(champion)
        return champion, version_quality(manifest.metrics, manifest.trained_on, manifest.created_at)
    from broadfast.core.datasets import load_pairs
    from broadfast.model.student import StudentConfig, build_student
    from broadfast.training.distill import TrainConfig, train_offline_frame
    from broadfast.training.gate import Gate
    from broadfast.training.online import is_held_out, validation_frame
    from broadfast.training.shrink import shrink_student
    from broadfast.training.targets import human_targets

    training = settings.training
    source = data.with_name("train.parquet") if data.with_name("train.parquet").exists() else data
    df = load_pairs(source, require_grade=True)
    df = df[[not is_held_out(q, training.online_val_share) for q in df["query"]]]
    df = df.sample(n=min(pairs, len(df)), random_state=seed).reset_index(drop=True)
    kind = "relevance" if "relevance" in df.columns else "grade"
    cfg = StudentConfig.tiny() if student == "tiny" else StudentConfig.minilm(max_length=64)
    first = None
    if layers is not None and layers < cfg.layers:
        first, _ = shrink_student(build_student(cfg, "cpu"), layers)  # the encoder's bottom layers
        cfg = first.config
    train_cfg = TrainConfig(epochs=1, batch_size=16, checkpoint=False, progress=progress, seed=seed, device="cpu")
    log.info("bootstrapping a first %s student (%d encoder layers) on %d human-labelled pairs of %s", student, cfg.layers, len(df), source)
    teachers = {f"human-{kind}({source.parent.name}/{source.name})": len(df)}
    model, _ = train_offline_frame(df, human_targets(df, kind), train_cfg, cfg, out, resume=False, trained_on={"bootstrap": str(source), "pairs": len(df), "teachers": teachers}, student=first)
    # measured exactly as the online trainer's gate measures every later version
    val = validation_frame(val_files, training.online_val_share, training.online_val_pairs)
    measured = Gate(val).measure(model)
    metrics = {f"val_{k}": v for k, v in measured.metrics.items() if np.isfinite(v)}
    log.info("first student: validation spearman %.4f, ndcg@10 %.4f on %d pairs", measured.metrics.get("spearman", float("nan")), measured.metrics.get("ndcg@10", float("nan")), len(val))
    manifest = registry.publish(out, champion=True, announce=False, metrics=metrics)
    return manifest.version, version_quality(manifest.metrics, manifest.trained_on, manifest.created_at)
