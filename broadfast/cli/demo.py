"""The `broadfast demo` command (the main job); the orchestration lives in broadfast/demo/run.py."""

from __future__ import annotations

from pathlib import Path

import click

from broadfast.core.logs import command_settings


@click.command()
@click.option("--duration", type=click.FloatRange(min=1), default=300.0, show_default=True, help="Seconds of replayed traffic.")
@click.option(
    "--teacher", type=click.Choice(["oracle", "transformers", "vllm"]), default=None,
    help="Teacher: oracle (simulated annotator with the human judgements; the default, so the student visibly learns), "
    "transformers (local SmolLM2-135M) or vllm [BROADFAST_TEACHER_BACKEND; vllm when BROADFAST_TEACHER_URL is set].",
)
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Data set to replay [BROADFAST_DATA].")
@click.option("--summary", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write the summary as JSON here.")
@click.option("--rate", type=click.FloatRange(min=0.1), default=5.0, show_default=True, help="Search requests per second.")
@click.option("--student", type=click.Choice(["minilm", "tiny"]), default="minilm", show_default=True, help="First student when the registry has none: MiniLM, or a tiny random encoder (tests).")
@click.option("--student-layers", type=click.IntRange(min=1), default=3, show_default=True,
              help="Encoder layers of the first student: MiniLM's bottom N of 6, cheaper to score, train and gate; 6: the whole encoder. "
              "(A 3-layer student distilled from a trained 6-layer one serves a 50-ad request in 61 ms at p50, 96 ms at p99 with int8 and 2 threads: docs/serving.md.)")
@click.option("--bootstrap-pairs", type=click.IntRange(min=16), default=600, show_default=True, help="Human-labelled pairs the first student is trained on.")
@click.option("--shift-to", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A second data set (e.g. ../shared/data/crowdflower/train.parquet): the traffic switches to it after --shift-after seconds, a simulated shift (the summary gets the drift alert's delay and quality on the new traffic).")
@click.option("--shift-after", type=click.FloatRange(min=0), default=180.0, show_default=True, help="With --shift-to: seconds of --data traffic before the switch.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-live", is_flag=True, help="No live terminal view (logs only).")
def demo(duration: float, teacher: str | None, data: Path | None, summary: Path | None, rate: float, student: str, student_layers: int, bootstrap_pairs: int,
         shift_to: Path | None, shift_after: float, seed: int, no_live: bool) -> None:  # fmt: skip
    """The main job: the whole online loop on the embedded stack.

    \b
    Starts the embedded broker and Redis, a first student (the registry's champion, or
    one bootstrapped from a small human-labelled slice), the scoring API, the stream app,
    the labeling worker, the online trainer and the monitor; replays traffic from the data
    set for --duration seconds with a live view of traffic, hard cases, labels, versions,
    swaps, latency, teacher–student agreement and each served version's validation
    quality; then writes a drift report, prints a summary (JSON with --summary) and shuts
    everything down. Ctrl-C shuts down cleanly too.

    \b
    Teacher: --teacher, else BROADFAST_TEACHER_BACKEND, else vllm when BROADFAST_TEACHER_URL
    is set, else the oracle — a simulated annotator answering with the data set's human
    judgements, so that the student visibly gets better. The local LLM (--teacher
    transformers, SmolLM2-135M) is real but too small to carry relevance signal.
    State and logs go under $BROADFAST_HOME/demo.
    """
    from broadfast.demo.run import DemoConfig, demo_teacher, run_demo
    from broadfast.demo.report import render_summary
    from broadfast.demo.shift import shift_lines

    settings = command_settings(teacher_backend=teacher)
    config = DemoConfig(
        duration_s=duration, teacher=demo_teacher(teacher, settings), data=data, summary=summary, rate=rate,
        student=student, student_layers=student_layers, bootstrap_pairs=bootstrap_pairs, seed=seed, live=not no_live, shift_to=shift_to, shift_after_s=shift_after,
    )  # fmt: skip
    result = run_demo(settings, config)
    click.echo(render_summary(result))
    if "shift" in result:
        click.echo("\n".join(shift_lines(result["shift"])))
    if result["components_died"]:
        raise SystemExit(1)
