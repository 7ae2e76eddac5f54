"""The README lists every command and every setting, and its two set-up commands exist."""

from __future__ import annotations

import re
from pathlib import Path

import click

from broadfast.cli.main import main
from broadfast.core.settings import flat_fields

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_every_setting_is_documented_and_the_table_is_current() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("update_readme", REPO / "scripts" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    assert module.render(README) == README, "README settings table is stale: run python scripts/update_readme.py"
    for name in flat_fields():
        assert f"BROADFAST_{name.upper()}" in README
    assert "PydanticUndefined" not in README


def test_every_command_is_listed() -> None:
    for name, command in main.commands.items():
        assert f"broadfast {name}" in README, name
        if isinstance(command, click.Group):
            for sub in command.commands:
                assert re.search(rf"broadfast {name}[^\n]*\b{sub}\b", README), f"{name} {sub}"


def test_two_setup_commands_exist() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "make demo" in README and "make test" in README
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "broadfast demo" in makefile
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci
