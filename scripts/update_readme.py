"""Regenerate the README's settings table from broadfast.core.settings (run after adding a setting)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from broadfast.core.settings import settings_table  # noqa: E402

START, END = "<!-- settings:start -->", "<!-- settings:end -->"


def render(readme: str) -> str:
    return re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: f"{START}\n{settings_table()}\n{END}", readme, flags=re.S)


if __name__ == "__main__":
    path = ROOT / "README.md"
    path.write_text(render(path.read_text()))
    print(f"updated {path}")
