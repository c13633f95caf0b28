"""structlog set-up, called once by each entrypoint: JSON lines for machines, readable lines on a terminal."""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

import structlog

LOG_FORMATS = ("auto", "json", "console")


_console = False
# Called with every event (a copy, before it is rendered), also the dropped ones: the coordinator's control API keeps
# each run's events this way.
_sinks: list = []


def add_sink(sink) -> None:
    """`sink(event_dict)` sees every event logged from now on, with its context variables and timestamp."""
    _sinks.append(sink)


def remove_sink(sink) -> None:
    if sink in _sinks:
        _sinks.remove(sink)


def _to_sinks(logger, method, event_dict):
    for sink in list(_sinks):
        sink(dict(event_dict))
    return event_dict


def is_console() -> bool:
    """True when logs are rendered for a person on a terminal rather than as JSON lines."""
    return _console


def wants_console(fmt: str = "auto") -> bool:
    return fmt == "console" or (fmt == "auto" and sys.stdout.isatty())


def _dropping(events: frozenset[str]):
    def drop(logger, method, event_dict):
        if event_dict.get("event") in events:
            raise structlog.DropEvent
        return event_dict

    return drop


def configure_logging(
    fmt: str = "auto", level: str = "info", file: TextIO | None = None, drop: frozenset[str] = frozenset()
) -> None:
    """`file`: where the lines go (default stdout), e.g. above a live progress view, which also shows the events
    named in `drop` in its own way."""
    global _console
    use_json = not wants_console(fmt)
    _console = not use_json
    out = file or sys.stdout
    # Colours only for a terminal: `--log-format console > file` or `| less` gets plain text. NO_COLOR is honoured.
    colours = (file is not None or out.isatty()) and not os.environ.get("NO_COLOR")
    renderer = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=colours)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _to_sinks,
            _dropping(drop),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
