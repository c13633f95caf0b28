"""structlog set-up, called once by each entrypoint: JSON lines for machines, readable lines on a terminal."""

from __future__ import annotations

import logging
import sys

import structlog

LOG_FORMATS = ("auto", "json", "console")


_console = False


def is_console() -> bool:
    """True when logs are rendered for a person on a terminal rather than as JSON lines."""
    return _console


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    global _console
    use_json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    _console = not use_json
    renderer = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )
