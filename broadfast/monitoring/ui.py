"""The Evidently UI over the monitoring workspace.

``broadfast ui`` serves Evidently's own web service (the same one ``evidently ui
--workspace DIR`` starts) on ``BROADFAST_UI_HOST:BROADFAST_UI_PORT`` over
``BROADFAST_MONITOR_WORKSPACE``; the drift and A/B projects are created up front, so
the UI lists them before the first report lands.
"""

from __future__ import annotations

import logging

from broadfast.core.settings import Settings
from broadfast.monitoring.workspace import PROJECTS, open_workspace, project_id, workspace_path

log = logging.getLogger(__name__)


def prepare_workspace(settings: Settings) -> None:
    """Create the workspace folder and its projects when missing."""
    ws = open_workspace(settings)
    for name in PROJECTS:
        project_id(ws, name)


def serve_ui(settings: Settings) -> None:
    """Run the Evidently UI (blocking) on the configured host and port."""
    from evidently.ui.service.app import get_config, run

    prepare_workspace(settings)
    path = workspace_path(settings)
    log.info("Evidently UI on http://%s:%d over %s", settings.monitoring.ui_host, settings.monitoring.ui_port, path)
    run(get_config(host=settings.monitoring.ui_host, port=settings.monitoring.ui_port, workspace=str(path)))
