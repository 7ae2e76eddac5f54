"""Logging set-up: one call per process, to stderr, at the configured level."""

from __future__ import annotations

import logging
import sys
from typing import Any

from broadfast.core.settings import Settings, get_settings


def setup_logging(level: str = "INFO") -> None:
    """Plain timestamped lines on stderr; third-party chatter kept at WARNING."""
    root = logging.getLogger()
    if getattr(root, "_broadfast_configured", False):
        root.setLevel(level)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root.handlers[:] = [handler]
    root.setLevel(level)
    quiet = level != "DEBUG"
    for noisy in ("urllib3", "httpx", "httpcore", "faust", "mode"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # kafka-python logs every refused connection retry at ERROR; our own code reports the outcome.
    for chatty in ("kafka", "aiokafka"):
        logging.getLogger(chatty).setLevel(logging.CRITICAL if quiet else logging.DEBUG)
    root._broadfast_configured = True  # type: ignore[attr-defined]


def command_settings(**overrides: Any) -> Settings:
    """The process settings with a command's flags applied (None: not given), logging set up."""
    settings = get_settings(**overrides)
    setup_logging(settings.log_level)
    return settings
