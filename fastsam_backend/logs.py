"""Logging set-up for every entry point (the server, the workers, the CLI): one format, to stderr."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))  # a line per LS call
