"""The `fedpi` command: one entry point for everything fedpi does.

  fedpi worker --id alice --port 50051 ...        a worker
  fedpi train --workers alice=HOST:PORT,... ...   train on running workers
  fedpi demo --rounds 5                           three local workers and a training run on them
  fedpi status --workers alice=HOST:PORT,...      every worker's GetInfo as a table
  fedpi report RUN_DIR                            report.html with plots from a run's metrics
  fedpi tasks                                     the installed tasks (--task NAME on train, demo and worker)
  fedpi serve --state-dir results                 a long-running coordinator with a gRPC control API
  fedpi runs list|start|get|watch|stop|resume|model   talk to it (--coordinator HOST:PORT)
  fedpi config show --config run.toml             the run settings in effect, and where each comes from
  fedpi completion bash|zsh|fish                  shell completion: eval "$(fedpi completion bash)"

`fedpi COMMAND --help` describes each. The command lines are built without importing torch or grpc; a command
imports what it needs when it runs. This package only dispatches; it sits above both services, which never import
each other.
"""

from __future__ import annotations

import argparse
import sys

from fedpi.cli import Parser, innermost, version_line

SHELLS = ("bash", "zsh", "fish")


def build_parser() -> Parser:
    from coordinator_service import cli as coordinator_cli
    from coordinator_service import client, status
    from worker_service import cli as worker_cli

    p = Parser(prog="fedpi", description=__doc__)
    p.add_argument("-V", "--version", action="version", version=version_line(), help="print fedpi's version")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    worker = sub.add_parser(
        "worker", help="a worker: serves the fedpi.v1.Worker service on this device", description=worker_cli.__doc__
    )
    worker_cli.add_arguments(worker)
    coordinator_cli.add_commands(sub)
    status.add_arguments(
        sub.add_parser("status", help="every worker's GetInfo as a table (or --json)", description=status.__doc__)
    )
    report = sub.add_parser(
        "report",
        help="report.html with plots from a run's metrics",
        description="Write report.html (and PNGs) into a run directory.",
    )
    report.add_argument("run_dir", help="a training run's --output-dir (holds metrics.jsonl)")
    client.add_arguments(
        sub.add_parser(
            "runs",
            help="start, watch, stop and resume runs of a `fedpi serve`, fetch their models",
            description=client.__doc__,
        )
    )
    completion = sub.add_parser(
        "completion",
        help="print the shell completion script for bash, zsh or fish",
        description='Shell completion. bash: eval "$(fedpi completion bash)" in ~/.bashrc; '
        "zsh: the same in ~/.zshrc; fish: fedpi completion fish | source",
    )
    completion.add_argument("shell", choices=SHELLS, help="your shell")
    return p


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from coordinator_service.observe.report import ReportUnavailable, write_report

    try:
        out = write_report(Path(args.run_dir))
    except ReportUnavailable as exc:
        print(f"fedpi report: {exc}", file=sys.stderr)
        return 1
    print(f"{out} ({out.stat().st_size / 1e3:.0f} kB, self-contained: open it in any browser, offline)")
    return 0


def _completion(shell: str) -> int:
    from argcomplete import shellcode

    print(shellcode(["fedpi"], shell=shell))
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `fedpi ... | head`: the reader has what it wanted
        from fedpi.cli import broken_pipe

        return broken_pipe()


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    if argv is None:
        import argcomplete

        argcomplete.autocomplete(parser)  # answers a shell's completion request and exits; otherwise nothing
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if extra:  # said by the command they were given to, with its closest option
        innermost(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    args.command_parser, args.argv = innermost(parser, args), sys.argv[1:] if argv is None else argv
    if args.command == "worker":
        from worker_service.__main__ import run

        return run(args)
    if args.command == "runs":
        from coordinator_service.client import run_command

        return run_command(args)
    if args.command in ("train", "demo", "tasks", "serve", "config"):
        from coordinator_service.__main__ import run

        return run(args)
    if args.command == "status":
        from coordinator_service.status import run

        return run(args)
    if args.command == "completion":
        return _completion(args.shell)
    return _report(args)
