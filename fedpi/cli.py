"""Command-line helpers shared by both services."""

from __future__ import annotations

import argparse
import os

ENV_PREFIX = "FEDPI_"


def env_name(flag: str) -> str:
    """--data-dir -> FEDPI_DATA_DIR."""
    return ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")


def apply_env_defaults(parser: argparse.ArgumentParser) -> None:
    """Let every long flag of `parser` (and its subcommands) be set from FEDPI_<FLAG>, as Kubernetes ConfigMaps do.

    A flag given on the command line still wins. The help text names the variable.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                apply_env_defaults(sub)
            continue
        flags = [f for f in action.option_strings if f.startswith("--")]
        if not flags or action.dest == "help":
            continue
        name = env_name(flags[0])
        action.help = f"{action.help or ''} [env {name}]".strip()
        value = os.environ.get(name)
        if value is None:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            action.default = value.strip().lower() in ("1", "true", "yes", "on")
            continue
        try:
            action.default = action.type(value) if action.type else value
        except ValueError as exc:
            parser.error(f"{name}={value!r} is not a valid value for {flags[0]}: {exc}")
        action.required = False


def read_secret(path: str, flag: str) -> str:
    """A token from a file (a mounted Kubernetes Secret), stripped; a clear error if missing or empty."""
    try:
        value = open(path, encoding="utf-8").read().strip()
    except OSError as exc:
        raise ValueError(f"{flag} {path}: {exc.strerror}") from None
    if not value:
        raise ValueError(f"{flag} {path} is empty")
    return value
