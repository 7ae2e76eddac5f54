"""Fetch the Compose Specification's JSON schema for the compose-file test.

The schema ships inside the `docker-compose` 1.29.2 wheel on PyPI (compose/config/compose_spec.json).
We download that wheel without its dependencies (it is never installed), extract the one file to
.venv/share/broadfast/compose_spec.json, and keep nothing else. Run by scripts/bootstrap.sh.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "docker-compose==1.29.2"
MEMBER = "compose/config/compose_spec.json"


def target() -> Path:
    return Path(sys.prefix) / "share" / "broadfast" / "compose_spec.json"


def main() -> int:
    out = target()
    if out.exists():
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", tmp, WHEEL], check=True)
        wheel = next(Path(tmp).glob("docker_compose-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(MEMBER)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    print(f"compose schema -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
