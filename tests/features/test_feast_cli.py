"""The plain `feast` CLI on the repo, with the exports of `broadfast features env` — and the
library reading what it registered."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from broadfast.features import store as fs

FEAST = Path(sys.executable).parent / "feast"


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)


def _exports(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            out[key] = shlex.split(value)[0]
    return out


@pytest.mark.integration
def test_plain_feast_apply_and_list_on_the_exported_env(bus_settings, shared_data, tmp_path) -> None:
    subset = pd.read_parquet(shared_data / "homedepot" / "dev.parquet").head(40)
    data = tmp_path / "pairs.parquet"
    subset.to_parquet(data)
    settings = bus_settings.model_copy(update={"feast_data": tmp_path / "feast", "home": tmp_path, "data": data, "feast_project": "plain_cli"})
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FEAST_", "BROADFAST_"))} | settings.public_env()

    broadfast = [sys.executable, "-m", "broadfast.cli.main", "features"]
    printed = _run([*broadfast, "env"], base)
    assert printed.returncode == 0, printed.stderr
    exports = _exports(printed.stdout)
    assert exports == {"BROADFAST_FEAST_REPO": str(fs.PACKAGE_REPO)} | fs.feast_env(settings)
    files = _run([*broadfast, "apply", "--files-only"], base)
    assert files.returncode == 0, files.stderr
    assert not (tmp_path / "feast" / "registry.db").exists()

    env = base | exports
    repo = exports["BROADFAST_FEAST_REPO"]
    applied = _run([str(FEAST), "-c", repo, "apply"], env)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    listed = _run([str(FEAST), "-c", repo, "feature-views", "list"], env)
    assert listed.returncode == 0, listed.stderr
    for view in ("ad_attributes", "ad_stream_counters", "query_stream_counters"):
        assert view in listed.stdout
    services = _run([str(FEAST), "-c", repo, "feature-services", "list"], env)
    assert "serving_v1" in services.stdout, services.stdout + services.stderr
    assert (tmp_path / "feast" / "registry.db").is_file()

    end = (datetime.now(UTC) + timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%S")
    loaded = _run([str(FEAST), "-c", repo, "materialize-incremental", end], env)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr

    # the library, in a fresh process (Feast's metrics set PROMETHEUS_MULTIPROC_DIR on import),
    # reads what plain Feast registered and loaded
    ad = str(subset["product_id"].iloc[0])
    code = f"from broadfast.core.settings import Settings; from broadfast.features.store import OnlineFeatures; print(OnlineFeatures(Settings()).read('q', [{ad!r}])[0]['ad_title_chars'])"
    read = _run([sys.executable, "-c", code], base)
    assert read.returncode == 0, read.stderr
    assert float(read.stdout.split()[-1]) == len(subset["title"].iloc[0])

    # without the exports, feast stops on the definitions' clear error, not on a literal path
    bare = _run([str(FEAST), "-c", repo, "apply"], base | {"FEAST_PROJECT": "plain_cli", "FEAST_REDIS_CONNECTION": exports["FEAST_REDIS_CONNECTION"]})
    assert bare.returncode != 0 and "FEAST_DATA_DIR is not set" in bare.stderr
