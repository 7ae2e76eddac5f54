"""Shared bits of the benchmarks: a stack to run against, the machine line, the table writer."""

from __future__ import annotations

import os
import platform
import shlex
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from broadfast.core.settings import Settings

RESULTS = Path(__file__).resolve().parent / "results"


@contextmanager
def embedded_or_configured_stack() -> Iterator[Settings]:
    """Settings for the configured broker if BROADFAST_KAFKA_BOOTSTRAP is set, else a fresh embedded stack."""
    from broadfast.core.bus import ensure_topics
    from broadfast.devstack.stack import EmbeddedStack

    if os.environ.get("BROADFAST_KAFKA_BOOTSTRAP"):
        settings = Settings()
        ensure_topics(settings)
        yield settings
        return
    with tempfile.TemporaryDirectory(prefix="broadfast-bench-") as home:
        stack = EmbeddedStack(Settings(home=Path(home)))
        state, _ = stack.up()
        try:
            yield state.settings(Settings(home=Path(home)))
        finally:
            stack.down()


def machine() -> str:
    """One line naming where the figures were taken."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"GPU {torch.cuda.get_device_name(0)}; {os.cpu_count()} CPU cores"
    except ImportError:
        pass
    return f"CPU only: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), Python {platform.python_version()}"


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            if v != v:
                return "—"
            return f"{v:.4f}" if abs(v) < 10 else f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def invocation() -> str:
    """The command line that ran this benchmark, quoted so that it can be pasted back into a shell."""
    return "python " + shlex.join(sys.argv)


def write_result(name: str, title: str, command: str, body: str, notes: str = "") -> Path:
    """Write benchmarks/results/<name>.md with the machine, date and command, and print it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    text = f"# {title}\n\n- machine: {machine()}\n- load average at the end (1, 5, 15 min): {load}\n- date: {stamp}\n- command: `{command}`\n\n{body}\n"
    if notes:
        text += f"\n{notes.strip()}\n"
    path = RESULTS / f"{name}.md"
    path.write_text(text)
    print(text)
    return path
