"""Process-level defaults: offline, quiet, reproducible.

Called at the start of every stage and CLI command (never at import), before the
libraries that read these variables are imported; logging is set up here too.
"""

from __future__ import annotations

import logging
import os
import sys

# Libraries that phone home or check for updates unless told not to. This project runs
# offline by default, so they are told not to; a user's own setting wins.
_OFFLINE_DEFAULTS = {
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "BENTOML_DO_NOT_TRACK": "True",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "GIT_PYTHON_REFRESH": "quiet",
}


def offline_env() -> None:
    """Set the offline defaults for variables the user has not set."""
    for key, value in _OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)


def set_threads(threads: int) -> None:
    """Bound torch's CPU threads (the machine may have fewer cores than torch assumes)."""
    import torch

    torch.set_num_threads(threads)


def configure_logging() -> None:
    """Show segflow's own log records on stdout, plainly, as stage and CLI output.

    Library code logs through named `segflow.*` loggers and never configures logging itself;
    stages and the CLI call this first. SEGFLOW_LOG_LEVEL (default INFO) sets the level;
    DEBUG adds what is only useful when reporting a bug.
    """
    logger = logging.getLogger("segflow")
    level = os.environ.get("SEGFLOW_LOG_LEVEL", "INFO").upper()
    if level not in logging.getLevelNamesMapping():
        logger.warning("SEGFLOW_LOG_LEVEL=%s is not a level (DEBUG, INFO, WARNING, ERROR); using INFO", level)
        level = "INFO"
    logger.setLevel(level)
    if not any(getattr(h, "_segflow", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._segflow = True  # one handler, however often this runs
        logger.addHandler(handler)
