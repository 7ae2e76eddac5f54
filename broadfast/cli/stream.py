"""Command-line commands of broadfast/stream/ (registered on the `broadfast` group in broadfast/cli/main.py).

Keep imports of heavy libraries inside the command functions so `broadfast --help` stays fast.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
from pathlib import Path

import click

from broadfast.core.logs import command_settings


# -- stack ---------------------------------------------------------------------------------
@click.group()
def stack() -> None:
    """The embedded single-machine stack: a Kafka-protocol broker (Tansu) and Redis on loopback."""


@stack.command("up")
@click.option("--partitions", type=int, default=None, help="Partitions per topic [BROADFAST_TOPIC_PARTITIONS].")
def stack_up(partitions: int | None) -> None:
    """Start the broker and Redis on free ports, create the topics, print shell exports.

    Safe to run twice: a running stack is reused; a stale one (a process died) is cleaned
    and started again. Use it as  eval "$(broadfast stack up)".
    """
    from broadfast.devstack.stack import EmbeddedStack, exports

    settings = command_settings(topic_partitions=partitions)
    state, started = EmbeddedStack(settings).up()
    b, r = state.services["broker"], state.services["redis"]
    verb = "started" if started else "already running:"
    click.echo(f"# broadfast stack {verb} broker pid {b.pid} on port {b.port}, redis pid {r.pid} on port {r.port}", err=True)
    click.echo(exports(state.env))


@stack.command("down")
def stack_down() -> None:
    """Stop exactly the processes `stack up` started (by recorded PID and start time)."""
    from broadfast.devstack.stack import EmbeddedStack

    stopped = EmbeddedStack(command_settings()).down()
    click.echo(f"stopped {', '.join(stopped)}" if stopped else "nothing to stop")


@stack.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def stack_status(as_json: bool) -> None:
    """Say what runs; exit status 0 when the stack is up and answering, 3 otherwise."""
    from broadfast.devstack.stack import EmbeddedStack

    status = EmbeddedStack(command_settings()).status()
    if as_json:
        click.echo(json.dumps(status, indent=2))
    elif not status["services"]:
        click.echo("stack: not running")
    else:
        click.echo(f"stack: {'running' if status['running'] else 'STALE (run `broadfast stack up` or `down` to clean)'}")
        for name, svc in status["services"].items():
            click.echo(f"  {name:<7} pid {svc['pid']:<8} port {svc['port']:<6} {'alive' if svc['alive'] else 'dead'}")
    sys.exit(0 if status.get("running") else 3)


# -- replay --------------------------------------------------------------------------------
@click.command()
@click.option("--data", "data", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Parquet file of labelled pairs [BROADFAST_DATA].")
@click.option("--rate", type=float, default=0.0, show_default=True, help="Requests per second (0: as fast as possible).")
@click.option("--limit", type=click.IntRange(min=1), default=1000, show_default=True, help="Number of search requests.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for request order, users and clicks.")
@click.option("--max-ads", type=click.IntRange(min=1), default=50, show_default=True, help="Most candidate ads per request.")
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True, help="Requests in flight to the scoring API.")
@click.option("--scoring-url", default=None, help="Scoring API base URL [BROADFAST_SCORING_URL]; without it ads keep retrieval order.")
@click.option("--shift-to", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="A second data set: the traffic switches to it after --shift-after requests (a simulated shift of traffic).")
@click.option("--shift-after", type=click.IntRange(min=0), default=None, help="With --shift-to: requests from --data before the switch (default: half of --limit).")
def replay(data: Path | None, rate: float, limit: int, seed: int, max_ads: int, concurrency: int, scoring_url: str | None, shift_to: Path | None, shift_after: int | None) -> None:
    """Simulated search frontend: replay a data set as search requests with clicks.

    Logs each request to <prefix>.requests, ranks its ads by the scoring API's scores (if
    configured), and logs position-biased clicks (driven by the true grade) to
    <prefix>.clicks. With --shift-to the traffic switches to another data set part-way
    (new queries and products: what drift monitoring and the online loop are for). See
    docs/replay.md for the click model.
    """
    if shift_after is not None and shift_to is None:
        raise click.UsageError("--shift-after needs --shift-to")
    from tqdm import tqdm

    from broadfast.core.bus import EventBus
    from broadfast.core.datasets import load_pairs
    from broadfast.simulation.replay import HttpScorer, Replayer, plan_requests, shifted

    settings = command_settings(data=data, scoring_url=scoring_url)
    df = load_pairs(settings.data, require_grade=True)
    scorer = HttpScorer(settings.serving.scoring_url) if settings.serving.scoring_url else None
    logging.getLogger("broadfast.replay").info("replaying %d requests from %s (%d pairs, %d queries)%s", limit, settings.data, len(df), df["query"].nunique(), f" scored by {settings.serving.scoring_url}" if scorer else "")
    planned = plan_requests(df, limit=limit, seed=seed, max_ads=max_ads)
    if shift_to is not None:
        after = limit // 2 if shift_after is None else min(shift_after, limit)
        second = load_pairs(shift_to, require_grade=True)
        planned = itertools.islice(shifted(planned, plan_requests(second, limit=None, seed=seed, max_ads=max_ads), after_requests=after), limit)
        logging.getLogger("broadfast.replay").info("the traffic shifts to %s (%d pairs, %d queries) after %d requests", shift_to, len(second), second["query"].nunique(), after)
    with EventBus(settings) as bus, tqdm(total=limit, unit="req", desc="replay", disable=None) as bar:
        stats = Replayer(bus, scorer=scorer, seed=seed).run(planned, rate=rate or None, concurrency=concurrency, progress=bar.update)
    if scorer is not None:
        scorer.close()
    click.echo(stats.summary())
    if stats.events_lost:
        raise SystemExit(1)  # events were lost: a script that checks the exit status must know



@click.command()
@click.option("--budget", "stream_budget_per_s", type=float, default=None, help="Hard cases per second, shared by all workers [BROADFAST_STREAM_BUDGET_PER_S].")
@click.option("--web-port", "stream_web_port", type=int, default=None, help="faust web (stats) port, 0 for none [BROADFAST_STREAM_WEB_PORT].")
@click.option("--no-features", is_flag=True, help="Do not push counters to Feast [BROADFAST_STREAM_PUSH_FEATURES=false].")
def stream(stream_budget_per_s: float | None, stream_web_port: int | None, no_features: bool) -> None:
    """The faust worker: hard-case sampling and windowed counters.

    Reads <prefix>.scored and <prefix>.clicks; writes hard cases (with their reasons) to
    <prefix>.hardcases under the labeling budget, keeps impressions/clicks/CTR per ad and
    per query in Redis and pushes them to the Feast online store (run `broadfast features
    apply` first, or pass --no-features). Run more of them to scale: they share one group,
    one budget and one set of counters. See docs/stream.md.
    """
    from broadfast.stream.app import run_worker

    settings = command_settings(stream_budget_per_s=stream_budget_per_s, stream_web_port=stream_web_port, stream_push_features=False if no_features else None)
    run_worker(settings)
