"""Logging set-up shared by the CLI, the trainer and the operator."""

from __future__ import annotations

import logging
import os


def setup_logging(level: str = "INFO") -> None:
    """Send log records to stderr with time, level and logger name; WXSCALE_LOG_LEVEL overrides `level`."""
    chosen = os.environ.get("WXSCALE_LOG_LEVEL", level).upper()
    logging.basicConfig(
        level=getattr(logging, chosen, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
    # Libraries that log every request at INFO would drown the trial's progress lines.
    for noisy in ("botocore", "s3fs", "fsspec", "urllib3", "aiobotocore", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
