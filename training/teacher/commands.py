"""Command-line commands of training/teacher/ (registered on the `broadfast` group in broadfast/cli.py).

Keep imports of heavy libraries inside the command functions so `broadfast --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from broadfast.cli_support import NOT_BUILT, command_settings, not_built


@click.command(help=NOT_BUILT.format(issue=4) + "The teacher labeling worker, or batch labelling of a file of pairs (--data/--out).")
@click.option("--teacher", type=click.Choice(["vllm", "transformers", "oracle"]), default=None, help="Teacher backend [BROADFAST_TEACHER_BACKEND].")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Label this parquet file of pairs instead of the topic.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Where batch labels go (with --data).")
def label(teacher: str | None, data: Path | None, out: Path | None) -> None:
    command_settings(teacher_backend=teacher)
    not_built(4, "the teacher labeling worker")



@click.group()
def teacher() -> None:
    """Teacher training recipes: SFT, then DPO."""


@teacher.command("sft", help=NOT_BUILT.format(issue=4) + "Supervised fine-tuning on rationales that agree with the human grade.")
def teacher_sft() -> None:
    command_settings()
    not_built(4, "teacher SFT")


@teacher.command("dpo", help=NOT_BUILT.format(issue=4) + "DPO: correct rationale chosen, wrong-grade rationale rejected.")
def teacher_dpo() -> None:
    command_settings()
    not_built(4, "teacher DPO")
