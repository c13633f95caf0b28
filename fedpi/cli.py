"""Command-line helpers shared by both services."""

from __future__ import annotations

import argparse
import difflib
import os
from collections.abc import Collection

from fedpi import names

ENV_PREFIX = "FEDPI_"


def broken_pipe() -> int:
    """The reader went away (`fedpi status --json | head`): stop writing, quietly, as other tools do."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # so that the interpreter's last flush of stdout cannot fail either
    return 0


def version_line() -> str:
    from fedpi import __version__
    from fedpi.net.protocol import PROTOCOL_VERSION

    return f"fedpi {__version__} (protocol {PROTOCOL_VERSION})"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written, and every option's default in its help, once: not where the help already says it,
    and not an empty one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "default" in (action.help or "") or action.default in ("", None):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with fedpi's manners: every --help ends with the version and shows the defaults; a mistake is one
    line saying what was wrong and the closest valid choice, not the whole usage; no prefix matching of options
    (`--out` is not `--output-dir`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("epilog", version_line())
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        hint = self._closest(message)
        self.exit(2, f"{self.prog}: error: {message}{hint}\n{self.prog} --help lists every option\n")

    def _closest(self, message: str) -> str:
        if message.startswith("unrecognized arguments: "):
            options = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            for word in message.removeprefix("unrecognized arguments: ").split():
                flag = word.split("=", 1)[0]
                if flag.startswith("-") and (close := difflib.get_close_matches(flag, options, n=1)):
                    return f" (did you mean {close[0]}?)"
        if message.startswith("argument ") and "invalid choice: " in message:
            given = message.split("invalid choice: ", 1)[1].split("'")[1] if "'" in message else ""
            choices = [c for a in self._actions for c in (a.choices or ())]
            if given and (close := difflib.get_close_matches(given, [str(c) for c in choices], n=1)):
                return f" (did you mean {close[0]}?)"
        return ""


def env_name(flag: str) -> str:
    """--data-dir -> FEDPI_DATA_DIR."""
    return ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")


def apply_env_defaults(parser: argparse.ArgumentParser, skip: Collection[str] = frozenset()) -> None:
    """Let every long flag of `parser` (and its subcommands) be set from FEDPI_<FLAG>, as Kubernetes ConfigMaps do.

    A flag given on the command line still wins. The help text names the variable. Flags whose dest is in `skip`
    read their variables elsewhere (run settings: coordinator_service.settings).
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                apply_env_defaults(sub, skip)
            continue
        flags = [f for f in action.option_strings if f.startswith("--")]
        if not flags or action.dest == "help" or action.dest in skip:
            continue
        name = env_name(flags[0])
        if f"[env {name}]" not in (action.help or ""):  # a parser may pass through here twice
            action.help = f"{action.help or ''} [env {name}]".strip()
        value = os.environ.get(name)
        if value is None:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            flag = value.strip().lower()
            if flag not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
                parser.error(f"{name}={value!r} is not a valid value for {flags[0]}: use true or false")
            action.default = flag in ("1", "true", "yes", "on")
            continue
        try:
            action.default = action.type(value) if callable(action.type) else value
        except (ValueError, TypeError) as exc:
            parser.error(f"{name}={value!r} is not a valid value for {flags[0]}: {exc}")
        if action.choices is not None and action.default not in action.choices:
            parser.error(
                f"{name}={value!r} is not a valid value for {flags[0]}: choose from "
                f"{', '.join(map(str, action.choices))}"
            )
        action.required = False


def add_task_arguments(parser: argparse.ArgumentParser, default_dataset: str) -> None:
    """--task and the options every task gets (--data-dir, --no-download), and the built-in task's own."""
    parser.add_argument(
        "--task",
        default=names.DEFAULT_TASK,
        help="what to train: a task name from `fedpi tasks` or package.module:TaskClass (docs/tasks.md)",
    )
    parser.add_argument(
        "--model",
        choices=names.MODEL_NAMES,
        default=None,
        help=f"the built-in mnist task's model (default {names.DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--dataset",
        choices=names.DATASETS,
        default=None,
        help=f"the built-in mnist task's data (default {default_dataset})",
    )
    parser.set_defaults(default_dataset=default_dataset)
    parser.add_argument("--data-dir", default="data", help="where the task reads (or downloads) its data")
    parser.add_argument(
        "--no-download", action="store_true", default=False, help="never download; read local files only"
    )


def make_task(args: argparse.Namespace):
    """The task named by --task, built from the parsed arguments."""
    from fedpi.task import build_task

    return build_task(
        args.task,
        data_dir=args.data_dir,
        download=not args.no_download,
        model=args.model,
        dataset=args.dataset or args.default_dataset,
        given_dataset=args.dataset,
    )


def innermost(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)command parser that parsed the last command word of `args`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = getattr(args, action.dest, None)
            if chosen in action.choices:
                return innermost(action.choices[chosen], args)
    return parser
