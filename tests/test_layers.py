"""The layers by role (docs/architecture.md) hold: import-linter's contracts in pyproject.toml pass,
every package of broadfast sits in a layer, and no import cycle exists at any depth."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

import broadfast

REPO = Path(__file__).resolve().parents[1]


def contracts() -> dict[str, dict]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["id"]: c for c in config["contracts"]}


def test_the_import_contracts_pass() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")  # import-linter's own command, from the test extra
    proc = subprocess.run([str(lint_imports), "--config", str(REPO / "pyproject.toml"), "--no-cache", "--no-logo"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout and "Contracts: 2 kept" in proc.stdout, proc.stdout[-2000:]


def test_every_package_sits_in_a_layer() -> None:
    layered = {name.strip() for line in contracts()["layers"]["layers"] for name in line.split("|")}
    packages = {f"broadfast.{m.name}" for m in pkgutil.iter_modules(broadfast.__path__) if m.ispkg}
    assert packages == layered, f"not in a layer: {sorted(packages - layered)}; layers naming no package: {sorted(layered - packages)}"


def test_cycles_are_checked_from_the_root_at_every_depth() -> None:
    acyclic = contracts()["acyclic"]
    assert acyclic["type"] == "acyclic_siblings" and acyclic["ancestors"] == ["broadfast"]
    assert acyclic.get("depth", 10) >= 3  # broadfast.<layer>.<module>
