"""Where the Feast repo is and the environment it reads.

The repo (``broadfast/features/feature_repo/``, or your own with ``BROADFAST_FEAST_REPO``) is a
plain Feast repo: its feature_store.yaml holds ``${FEAST_PROJECT}``, ``${FEAST_DATA_DIR}`` and
``${FEAST_REDIS_CONNECTION}``, which Feast expands from the environment, and its definitions read
``FEAST_DATA_DIR``. :func:`feast_env` derives the values from the settings;
``broadfast features env`` prints them for the ``feast`` CLI and the library sets them around
each Feast call that reads the repo (:func:`feast_environment`). Feast leaves an unset variable
in place silently, so both sides check first and raise :class:`FeatureEnvError`.

>>> redis_connection_string("redis://127.0.0.1:6390/2")
'127.0.0.1:6390,db=2'
>>> redis_connection_string("rediss://:s3cret@cache:6380/0")
'cache:6380,db=0,password=s3cret,ssl=true'
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

# Importing Feast sets PROMETHEUS_MULTIPROC_DIR (feast/metrics.py), and prometheus_client picks its
# value class from that variable when first imported: import it first, so this process's metrics
# (serving, the stream worker) stay as the process's own environment says.
import prometheus_client.values  # noqa: F401  (before any feast import below)

from broadfast.core.errors import ConfigError
from broadfast.core.settings import Settings
from broadfast.features.errors import FeatureEnvError

PACKAGE_REPO = Path(__file__).resolve().parent / "feature_repo"
ENV_PROJECT = "FEAST_PROJECT"
ENV_DATA_DIR = "FEAST_DATA_DIR"
ENV_REDIS = "FEAST_REDIS_CONNECTION"
_VAR = re.compile(r"\$(?:\{([A-Za-z_]\w*)\}|([A-Za-z_]\w*))")


def repo_path(settings: Settings) -> Path:
    return (settings.features.feast_repo or PACKAGE_REPO).expanduser().resolve()


def data_path(settings: Settings) -> Path:
    """Registry and offline files (never inside the source tree)."""
    return (settings.features.feast_data or settings.home / "feast").expanduser().resolve()


def redis_connection_string(url: str) -> str:
    """Feast's ``host:port,db=N[,password=…][,ssl=true]`` form of a ``redis://`` URL."""
    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "rediss") or not parsed.hostname:
        raise ConfigError(f"BROADFAST_REDIS_URL must look like redis://host:port/db, got {url!r}")
    db = (parsed.path or "/0").lstrip("/") or "0"
    if not db.isdigit():
        raise ConfigError(f"BROADFAST_REDIS_URL has a database that is not a number: {db!r}")
    parts = [f"{parsed.hostname}:{parsed.port or 6379}", f"db={db}"]
    if parsed.password:
        parts.append(f"password={unquote(parsed.password)}")
    if parsed.scheme == "rediss":
        parts.append("ssl=true")
    return ",".join(parts)


def feast_env(settings: Settings) -> dict[str, str]:
    """The variables the repo reads, from the settings."""
    return {
        ENV_PROJECT: settings.features.feast_project,
        ENV_DATA_DIR: str(data_path(settings)),
        ENV_REDIS: redis_connection_string(settings.redis.redis_url),
    }


def require_env(name: str) -> str:
    """The value of ``name``; :class:`FeatureEnvError` when it is unset or empty."""
    value = os.environ.get(name, "")
    if not value:
        raise FeatureEnvError(f"{name} is not set; the Feast repo reads it. Run: eval \"$(broadfast features env)\"")
    return value


def yaml_file(repo: Path) -> Path:
    path = repo / "feature_store.yaml"
    if not path.is_file():
        raise ConfigError(f"no feature_store.yaml in the Feast repo {repo} (BROADFAST_FEAST_REPO)")
    return path


def check_yaml_env(repo: Path) -> None:
    """Refuse a feature_store.yaml whose ``$VAR`` / ``${VAR}`` is unset (Feast would keep it literally)."""
    path = yaml_file(repo)
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    for m in _VAR.finditer("\n".join(lines)):
        name = m.group(1) or m.group(2)
        if not os.environ.get(name):
            raise FeatureEnvError(f"{path}: ${{{name}}} is not set (run: eval \"$(broadfast features env)\")")


@contextmanager
def feast_environment(settings: Settings) -> Iterator[dict[str, str]]:
    """Set the repo's variables from the settings for the block, check the yaml, restore after."""
    values = feast_env(settings)
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        check_yaml_env(repo_path(settings))
        yield values
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def repo_config(settings: Settings) -> Any:
    """Feast's RepoConfig of the repo, read as the ``feast`` CLI reads it."""
    from feast.repo_config import load_repo_config

    with feast_environment(settings):
        repo = repo_path(settings)
        return load_repo_config(repo, yaml_file(repo))


def feature_store(settings: Settings) -> Any:
    """A ``FeatureStore(repo_path=…)`` on the repo, with its variables from the settings."""
    from feast import FeatureStore

    data_path(settings).mkdir(parents=True, exist_ok=True)
    with feast_environment(settings):
        return FeatureStore(repo_path=str(repo_path(settings)))


def repo_objects(settings: Settings) -> list[Any]:
    """Every module-level Feast object of the repo's ``*.py`` files, as ``feast apply`` collects them.

    The modules are imported afresh (their paths depend on ``FEAST_DATA_DIR``), by names relative
    to the repo as Feast names them.
    """
    from feast import Entity, FeatureService
    from feast.base_feature_view import BaseFeatureView
    from feast.data_source import DataSource
    from feast.repo_operations import get_repo_files

    repo = repo_path(settings)
    names = [".".join(p.relative_to(repo).with_suffix("").parts) for p in get_repo_files(repo)]
    objects: list[Any] = []
    with feast_environment(settings):
        sys.path.insert(0, str(repo))
        try:
            for name in names:
                sys.modules.pop(name, None)
            modules = [importlib.import_module(name) for name in names]
        finally:
            sys.path.remove(str(repo))
    for module in modules:
        for obj in vars(module).values():
            if isinstance(obj, Entity | DataSource | BaseFeatureView | FeatureService) and not any(obj is o for o in objects):
                objects.append(obj)
    return objects
