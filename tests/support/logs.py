"""A capture of everything this process logs, formatted as its own handler prints it."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import structlog

UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


@contextmanager
def captured_logs() -> Iterator[io.StringIO]:
    """Every log record of the process, formatted as the process's own handler would."""
    root = logging.getLogger()
    formatter = next(
        (
            h.formatter
            for h in root.handlers
            if isinstance(h.formatter, structlog.stdlib.ProcessorFormatter)
        ),
        root.handlers[0].formatter,
    )
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(formatter)
    saved = {}
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        saved[name] = (logger.handlers[:], logger.level, logger.propagate)
        # As in production: uvicorn at INFO (access lines too), through the root handler.
        logger.handlers[:] = []
        logger.propagate = True
        logger.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield buffer
    finally:
        root.removeHandler(handler)
        for name, (handlers, level, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate
