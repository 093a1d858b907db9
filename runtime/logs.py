"""Structured logging for every role: JSON lines by default, each line says who wrote it."""

from __future__ import annotations

import logging
import sys

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


def configure(role: str, worker: int | None = None, *, fmt: str = "json",
              level: str = "info", node: str | None = None) -> structlog.stdlib.BoundLogger:
    """Configure structlog for this process and return its logger, bound to role (and worker,
    and the daemon's node name in a fleet)."""
    renderer = (structlog.processors.JSONRenderer() if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    bound: dict[str, object] = {"role": role}
    if node:
        bound["node"] = node
    if worker is not None:
        bound["worker"] = worker
    structlog.contextvars.bind_contextvars(**bound)
    return structlog.get_logger()


def set_level(level: str) -> None:
    """Change the level at run time (config reload)."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(
        LEVELS.get(level, logging.INFO)))
