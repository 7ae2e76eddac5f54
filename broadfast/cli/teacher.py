"""Command-line commands of broadfast/teacher/ (registered on the `broadfast` group in broadfast/cli/main.py).

Keep imports of heavy libraries inside the command functions so `broadfast --help` stays fast.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click

from broadfast.core.settings import Settings
from broadfast.core.logs import command_settings

log = logging.getLogger(__name__)


def make_teacher(settings: Settings, backend: str | None = None) -> Any:
    """The teacher the settings choose (``teacher_backend``), built lazily: an LLM teacher over a
    vLLM server or a local transformers model, or the oracle (a simulated annotator)."""
    from broadfast.teacher.mpcot import LLMTeacher, Rules, load_template
    from broadfast.teacher.errors import TemplateError

    backend = backend or settings.teacher.teacher_backend
    if backend == "oracle":
        from broadfast.simulation.oracle import OracleTeacher

        return OracleTeacher.from_settings(settings)
    template = load_template(settings.teacher.teacher_template)
    rules = Rules.load(settings.teacher.teacher_rules)
    if backend == "vllm":
        from broadfast.teacher.vllm_backend import VLLMEngine

        engine: Any = VLLMEngine.from_settings(settings.teacher)
    elif backend == "transformers":
        from broadfast.teacher.hf_backend import TransformersEngine

        engine = TransformersEngine.from_settings(settings.teacher, threads=settings.torch_threads)
    else:
        raise TemplateError(f"unknown teacher backend {backend!r} (vllm, transformers, oracle)")
    return LLMTeacher(
        engine=engine,
        backend=backend,
        template=template,
        rules=rules,
        weights=settings.teacher.teacher_weights or None,
        max_tokens=settings.teacher.teacher_max_tokens,
        temperature=settings.teacher.teacher_temperature,
        seed=settings.teacher.teacher_seed,
        min_mass=settings.teacher.teacher_min_mass,
    )


@click.command()
@click.option("--teacher", type=click.Choice(["vllm", "transformers", "oracle"]), default=None, help="Teacher backend [BROADFAST_TEACHER_BACKEND].")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Label this parquet file of pairs instead of the topic.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Where batch labels go (with --data).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="With --data: label only the first N pairs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Pairs per teacher call [BROADFAST_LABELER_BATCH].")
@click.option("--seed", type=int, default=None, help="Sampling seed (with BROADFAST_TEACHER_TEMPERATURE > 0) [BROADFAST_TEACHER_SEED].")
@click.option("--idle-exit", type=click.IntRange(min=1), default=None, help="Worker: stop after this many empty polls in a row (default: run until stopped).")
@click.option("--max-records", type=click.IntRange(min=1), default=None, help="Worker: stop after this many hard cases.")
def label(
    teacher: str | None, data: Path | None, out: Path | None, limit: int | None, batch_size: int | None, seed: int | None, idle_exit: int | None, max_records: int | None
) -> None:
    """The teacher labeling worker (relevance.hardcases -> relevance.labels), or batch labelling of a file.

    \b
    Worker:  broadfast label --teacher vllm        (BROADFAST_TEACHER_URL=http://host:port/v1)
    Batch:   broadfast label --data pairs.parquet --out labels.parquet [--limit 300]
    """
    from broadfast.core.errors import ConfigError
    
    settings = command_settings(teacher_backend=teacher, labeler_batch=batch_size, teacher_seed=seed)
    if (data is None) != (out is None):
        raise ConfigError("batch labelling needs both --data and --out")
    _torch_threads(settings.torch_threads)
    t = make_teacher(settings)
    if data is not None and out is not None:
        from broadfast.teacher.labels import label_file

        summary = label_file(t, data, out, batch_size=settings.teacher.labeler_batch, limit=limit)
        click.echo(json.dumps(summary | {"teacher_id": t.teacher_id}, indent=2))
        return

    from broadfast.core.keys import labelled_key
    from broadfast.teacher.worker import Labeler

    worker = Labeler(settings, t)
    click.echo(f"labeler {t.teacher_id}: {settings.topic('hardcases')} -> {settings.topic('labels')} (group {settings.teacher.labeler_group}, "
               f"labelled pairs in Redis hash {labelled_key(settings, t.teacher_id)})", err=True)

    def report(stats) -> None:
        log.info("labeler: %d consumed, %d labelled, %d skipped, %d failed", stats.consumed, stats.labelled, stats.skipped, stats.failed)

    try:
        stats = worker.run(idle_polls=idle_exit, max_records=max_records, on_batch=report)
    except KeyboardInterrupt:
        stats = worker.stats
    finally:
        worker.close()
    click.echo(json.dumps({"consumed": stats.consumed, "labelled": stats.labelled, "skipped": stats.skipped, "failed": stats.failed}), err=True)


def _torch_threads(n: int) -> None:
    try:
        import torch
    except ImportError:  # the oracle and vllm backends do not need torch
        return
    torch.set_num_threads(n)


@click.group()
def teacher() -> None:
    """Teacher training recipes: SFT, then DPO (on label files from `broadfast label --data`)."""


_common = [
    click.option("--labels", "labels", type=click.Path(dir_okay=False, path_type=Path), multiple=True, required=True, help="Label file(s) from `broadfast label --data … --out …` (repeatable)."),
    click.option("--data", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The labelled pairs with their human 'grade'."),
    click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder for the trained teacher (safetensors)."),
    click.option("--base", type=click.Path(path_type=Path), default=None, help="Starting model (folder or .gguf). Default: the packaged SmolLM2-135M-Instruct."),
    click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True),
    click.option("--lr", type=float, default=None, help="Learning rate (SFT 1e-5, DPO 5e-7 by default)."),
    click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True),
    click.option("--max-steps", type=click.IntRange(min=1), default=None),
    click.option("--seed", type=int, default=0, show_default=True),
]


def _options(fn):
    for opt in reversed(_common):
        fn = opt(fn)
    return fn


@teacher.command("sft")
@_options
def teacher_sft(labels: tuple[Path, ...], data: Path, out: Path, base: Path | None, epochs: int, lr: float | None, batch_size: int, max_steps: int | None, seed: int) -> None:
    """Supervised fine-tuning on rationales whose grade agrees with the human grade."""
    from broadfast.core.datasets import load_pairs
    from broadfast.teacher.train import (
        TeacherTrainConfig,
        default_base,
        read_labels,
        sft_examples,
        template_and_rules,
        train_sft,
    )

    settings = command_settings()
    _torch_threads(settings.torch_threads)
    template, rules = template_and_rules(settings)
    examples = sft_examples(read_labels(list(labels)), load_pairs(data, require_grade=True), template, rules)
    click.echo(f"SFT on {len(examples)} agreeing rationales", err=True)
    cfg = TeacherTrainConfig("sft", str(base or default_base()), template=settings.teacher.teacher_template, epochs=epochs, lr=lr or 1e-5, batch_size=batch_size, max_steps=max_steps, seed=seed)
    cfg = train_sft(examples, cfg, out)
    click.echo(json.dumps({"out": str(out), "examples": cfg.examples, **cfg.metrics}, indent=2))


@teacher.command("dpo")
@_options
@click.option("--beta", type=float, default=0.1, show_default=True, help="DPO temperature.")
def teacher_dpo(labels: tuple[Path, ...], data: Path, out: Path, base: Path | None, epochs: int, lr: float | None, batch_size: int, max_steps: int | None, seed: int, beta: float) -> None:
    """DPO: an agreeing rationale chosen, a wrong-grade rationale of the same prompt rejected."""
    from broadfast.core.datasets import load_pairs
    from broadfast.teacher.train import (
        TeacherTrainConfig,
        default_base,
        dpo_examples,
        read_labels,
        template_and_rules,
        train_dpo,
    )

    settings = command_settings()
    _torch_threads(settings.torch_threads)
    template, rules = template_and_rules(settings)
    examples = dpo_examples(read_labels(list(labels)), load_pairs(data, require_grade=True), template, rules)
    click.echo(f"DPO on {len(examples)} chosen/rejected pairs", err=True)
    cfg = TeacherTrainConfig("dpo", str(base or default_base()), template=settings.teacher.teacher_template, epochs=epochs, lr=lr or 5e-7, batch_size=batch_size, max_steps=max_steps, seed=seed, beta=beta)
    cfg = train_dpo(examples, cfg, out)
    click.echo(json.dumps({"out": str(out), "examples": cfg.examples, **cfg.metrics}, indent=2))
