"""A config file for the command lines: `fedpi train --config run.toml`, `fedpi serve --config ...`. Its keys are the
flags' names (`lr = 0.1`, `local-batches = 20`, `workers = "alice=10.0.0.11:50051"`), at the top or in tables named
as you like (`[training]`); the file is one more source, below the environment and the command line:

    defaults < preset < config file < FEDPI_* variables < flags

Run settings from the file become a layer of the settings model (coordinator_service.settings.merge); every other
key sets its flag unless the environment or the command line does.
"""

from __future__ import annotations

import argparse
import difflib
import os
import tomllib
from pathlib import Path
from typing import Any

from fedpi.cli import env_name


class ConfigError(ValueError):
    """A config file that cannot be read or names what no flag is; the message says which and why."""


def load(path: str | Path) -> dict[str, Any]:
    """The file's keys, tables flattened one level: {"lr": 0.1, "workers": "..."}."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path}: not TOML: {exc}") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        for name, item in value.items() if isinstance(value, dict) else [(key, value)]:
            name = name.replace("-", "_")
            if name in flat:
                raise ConfigError(f"--config {path}: {name.replace('_', '-')} is set twice")
            flat[name] = item
    return flat


def _given(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests of the options on this command line."""
    by_flag = {flag: a.dest for a in parser._actions for flag in a.option_strings}
    return {by_flag[token.split("=", 1)[0]] for token in argv if token.split("=", 1)[0] in by_flag}


def apply(
    path: str | Path, parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str], run_settings: set[str]
) -> dict[str, Any]:
    """Set `args` from the file where neither a flag nor a FEDPI_* variable did; return the run settings it holds
    (a layer for the settings model, which checks them)."""
    config = load(path)
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "version", "config")}
    given = _given(parser, argv)
    layer: dict[str, Any] = {}
    for name, value in config.items():
        if name in run_settings:
            layer[name] = value
            continue
        action = actions.get(name)
        if action is None:
            close = difflib.get_close_matches(name, [*actions, *run_settings], n=1)
            raise ConfigError(
                f"--config {path}: {name.replace('_', '-')} is not an option of this command"
                + (f" (did you mean {close[0].replace('_', '-')}?)" if close else "")
            )
        if name in given or os.environ.get(env_name(action.option_strings[-1])) is not None:
            continue  # the command line and the environment win
        setattr(args, name, _value(path, action, value))
    return layer


def _value(path, action: argparse.Action, value: Any) -> Any:
    flag = action.option_strings[-1]
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise ConfigError(f"--config {path}: {flag.lstrip('-')} = {value!r}: use true or false")
        return value
    try:
        converted = action.type(str(value)) if callable(action.type) else str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--config {path}: {flag.lstrip('-')} = {value!r}: {exc}") from None
    if action.choices is not None and converted not in action.choices:
        raise ConfigError(
            f"--config {path}: {flag.lstrip('-')} = {value!r}: choose from {', '.join(map(str, action.choices))}"
        )
    return converted
