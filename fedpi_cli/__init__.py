"""The `fedpi` command: one entry point for everything fedpi does.

  fedpi worker --id alice --port 50051 ...        a worker (python -m worker_service)
  fedpi train --workers alice=HOST:PORT,... ...   train on running workers (python -m coordinator_service train)
  fedpi demo --rounds 5                           three local workers and a training run on them
  fedpi status --workers alice=HOST:PORT,...      every worker's GetInfo as a table
  fedpi report RUN_DIR                            report.html with plots from a run's metrics
  fedpi tasks                                     the installed tasks (--task NAME on train, demo and worker)
  fedpi serve --state-dir results                 a long-running coordinator with a gRPC control API
  fedpi runs list|start|get|watch|stop|resume|model   talk to it (--coordinator HOST:PORT)

`fedpi COMMAND --help` describes each. This package only dispatches; it sits above both services, which never
import each other.
"""

from __future__ import annotations

import sys

COMMANDS = ("worker", "train", "demo", "status", "report", "tasks", "serve", "runs")


def _report(argv: list[str]) -> int:
    import argparse
    from pathlib import Path

    from coordinator_service.report import ReportUnavailable, write_report

    p = argparse.ArgumentParser(prog="fedpi report", description="write report.html (and PNGs) into a run directory")
    p.add_argument("run_dir", type=Path, help="a training run's --output-dir (holds metrics.jsonl)")
    args = p.parse_args(argv)
    try:
        out = write_report(args.run_dir)
    except ReportUnavailable as exc:
        print(f"fedpi report: {exc}", file=sys.stderr)
        return 1
    print(f"{out} ({out.stat().st_size / 1e3:.0f} kB, self-contained: open it in any browser, offline)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "worker":
        from worker_service.__main__ import main as worker_main
        return worker_main(rest, prog="fedpi worker")
    if command == "runs":
        from coordinator_service.client import main as runs_main
        return runs_main(rest)
    if command in ("train", "demo", "tasks", "serve"):
        from coordinator_service.__main__ import main as coordinator_main
        return coordinator_main([command, *rest], prog="fedpi")
    if command == "status":
        from coordinator_service.status import main as status_main
        return status_main(rest)
    return _report(rest)
