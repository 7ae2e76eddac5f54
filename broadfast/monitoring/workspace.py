"""The Evidently workspace: where every report is kept as a snapshot, and what the UI shows.

Two projects hold the snapshots: ``broadfast drift`` (one per drift report) and
``broadfast A/B`` (score-distribution, per-arm classification and arm-figure reports), each
with the dashboard panels of :mod:`broadfast.monitoring.dashboards`. The folder is
``BROADFAST_MONITOR_WORKSPACE`` (default ``<home>/monitoring/workspace``); reference
windows kept per model version live beside it in ``references/``.

>>> from broadfast.core.settings import Settings
>>> workspace_path(Settings(home="/tmp/bf")).as_posix()
'/tmp/bf/monitoring/workspace'
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pandas as pd

from broadfast.core.settings import Settings
from broadfast.monitoring.dashboards import AB_PROJECT, DRIFT_PROJECT, PROJECTS, ensure_dashboard

log = logging.getLogger(__name__)



def workspace_path(settings: Settings) -> Path:
    """The workspace folder (a setting, defaulting under ``settings.home``)."""
    return settings.monitoring.monitor_workspace or settings.home / "monitoring" / "workspace"


TRAFFIC_REFERENCE = "_traffic"  # the reference window of the input columns (the traffic, whatever version serves it)


def references_path(settings: Settings) -> Path:
    return workspace_path(settings).parent / "references"


def open_workspace(settings: Settings) -> Any:
    """The local Evidently workspace (created on first use)."""
    from evidently.ui.workspace import Workspace

    path = workspace_path(settings)
    path.mkdir(parents=True, exist_ok=True)
    return Workspace(str(path))


def project_id(workspace: Any, name: str) -> Any:
    """Id of the project called ``name``, created when missing; its dashboard panels are
    written when missing or changed (:func:`broadfast.monitoring.dashboards.ensure_dashboard`)."""
    found = workspace.search_project(name)
    if found:
        pid = found[0].id
    else:
        project = workspace.create_project(name, description=PROJECTS.get(name))
        project.save()
        pid = project.id
    ensure_dashboard(workspace, pid, name)
    return pid


def save_snapshot(settings: Settings, project: str, snapshot: Any, name: str | None = None) -> str:
    """Store one Evidently snapshot in a project of the workspace; returns its id."""
    ws = open_workspace(settings)
    ref = ws.add_run(project_id(ws, project), snapshot, include_data=False, name=name)
    log.info("snapshot %s saved to workspace %s (project %r)", ref.id, workspace_path(settings), project)
    return str(ref.id)


def _safe(version: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", version)[:120] or "_"


def save_reference(settings: Settings, model_version: str, window: pd.DataFrame) -> Path:
    """Keep a reference window for a model version (parquet), replacing an older one."""
    path = references_path(settings) / f"{_safe(model_version)}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    window.to_parquet(tmp, index=False)
    tmp.replace(path)
    log.info("reference window of %s saved (%d rows) to %s", model_version, len(window), path)
    return path


def load_reference(settings: Settings, model_version: str) -> pd.DataFrame | None:
    """The stored reference window of a model version, or None."""
    path = references_path(settings) / f"{_safe(model_version)}.parquet"
    return pd.read_parquet(path) if path.exists() else None
