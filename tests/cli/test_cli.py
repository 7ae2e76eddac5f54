"""The console script: every command exists where the design says and has readable help."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from broadfast.cli.main import main


def all_commands(group: click.Group = main, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, command in group.commands.items():
        path = prefix + (name,)
        out.append(path)
        if isinstance(command, click.Group):
            out.extend(all_commands(command, path))
    return out


COMMANDS = all_commands()


def test_the_design_maps_commands_exist() -> None:
    expected = {
        ("stack", "up"), ("stack", "down"), ("stack", "status"), ("demo",), ("replay",), ("serve",), ("stream",), ("label",),
        ("train", "offline"), ("train", "online"), ("predict",), ("registry", "list"), ("registry", "show"), ("registry", "publish"),
        ("rollout", "start"), ("rollout", "status"), ("rollout", "promote"), ("rollout", "rollback"),
        ("features", "apply"), ("features", "materialize"), ("drift",), ("monitor",), ("ui",),
    }
    assert expected <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_help_reads(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: main" in result.output or "Usage:" in result.output
    command: click.Command = main
    for part in path:
        command = command.commands[part]  # type: ignore[attr-defined]
    assert (command.help or "").strip(), f"{' '.join(path)} has no help text"


def test_top_level_help_lists_quick_start() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "stack up" in result.output and "BROADFAST_" in result.output


def test_settings_command_never_prints_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROADFAST_ADMIN_TOKEN", "s3cr3t-token")
    result = CliRunner().invoke(main, ["settings"])
    assert result.exit_code == 0
    assert "s3cr3t" not in result.output and "BROADFAST_ADMIN_TOKEN=<set>" in result.output
