"""The live view of a run on a terminal (rich): one line per worker inside the round, a bar over the rounds with its
ETA, and a row per finished round above them. Only used when stdout is a terminal; logs stay JSON elsewhere."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from coordinator_service.observe import RunObserver
from coordinator_service.rounds import RoundReport
from generated.fedpi.v1 import worker_pb2 as pb

_STYLES = {"waiting": "dim", "sending": "cyan", "training": "yellow", "receiving": "cyan", "done": "green",
           "dropped": "bold red"}


@dataclass
class _WorkerLine:
    state: str = "waiting"
    detail: str = ""
    batches_done: int = 0
    batches_total: int = 0
    loss: float | None = None
    samples_per_second: float | None = None


class _ConsoleFile:
    def __init__(self, console: Console):
        self.console = console

    def write(self, text: str) -> None:
        if text.strip():
            self.console.print(text.rstrip("\n"), markup=False, highlight=False, soft_wrap=True)

    def flush(self) -> None:
        pass


class LiveProgress(RunObserver):
    """A rich Live display fed by the round loop's hooks."""

    # Log events this view shows itself; the rest still print, above it.
    SHOWN_EVENTS = frozenset({"round_started", "round_finished", "worker_train_finished", "worker_dropped"})

    def __init__(self, batch_size: int, console: Console | None = None):
        self.batch_size = batch_size
        self.console = console or Console()
        self.lines: dict[str, _WorkerLine] = {}
        self.round = 0
        self.bar = Progress(TextColumn("[bold]rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("eta"), TimeRemainingColumn(), console=self.console)
        self.task = self.bar.add_task("rounds", total=None)
        self.live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False,
                         redirect_stdout=False)
        self._round_started = time.monotonic()

    def log_file(self) -> _ConsoleFile:
        """A file for the log lines, printed above the live view instead of through it."""
        return _ConsoleFile(self.console)

    # -- the view ----------------------------------------------------------------------------------------------

    def _render(self) -> Group:
        table = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
        for column in ("worker", "state", "batches", "loss", "samples/s"):
            table.add_column(column, justify="left" if column in ("worker", "state") else "right")
        for name, line in self.lines.items():
            total = f"/{line.batches_total}" if line.batches_total else ""
            state = Text(line.state + (f" ({line.detail})" if line.detail else ""), style=_STYLES[line.state])
            table.add_row(name, state, f"{line.batches_done}{total}",
                          f"{line.loss:.4f}" if line.loss is not None else "",
                          f"{line.samples_per_second:.0f}" if line.samples_per_second else "")
        header = Text(f"round {self.round}", style="bold") if self.round else Text("starting", style="dim")
        return Group(self.bar, header, table)

    def _refresh(self) -> None:
        self.live.update(self._render())

    def print_round(self, report: RoundReport) -> None:
        moved = sum(w.bytes_sent + w.bytes_received for w in report.workers) / 1e6
        failed = f"  dropped: {', '.join(f.worker for f in report.failures)}" if report.failures else ""
        if report.test_accuracy is not None:
            scores = f"accuracy {report.test_accuracy:7.2%}  loss {report.test_loss:.4f}"
        elif report.federated_accuracy is not None:
            scores = f"federated accuracy {report.federated_accuracy:7.2%}  loss {report.federated_loss:.4f}"
        else:
            scores = "not evaluated (the task has no test data: --federated-evaluation)"
        self.console.print(
            f"round {report.round:>3}  {scores}  "
            f"wall {report.wall_seconds:6.2f} s  overhead {report.overhead_seconds:5.2f} s  "
            f"moved {moved:7.1f} MB  workers {len(report.workers)}{failed}", highlight=False)

    # -- hooks -------------------------------------------------------------------------------------------------

    def run_started(self, rounds: int, first_round: int, workers: Sequence[str]) -> None:
        self.bar.update(self.task, total=rounds, completed=first_round - 1)
        self.lines = {w: _WorkerLine() for w in workers}
        self.live.start()

    def workers_present(self, workers: Sequence[str]) -> None:
        for w in workers:
            self.lines.setdefault(w, _WorkerLine())
        self._refresh()

    def round_started(self, number: int, workers: Sequence[str]) -> None:
        self.round = number
        for name in self.lines:
            self.lines[name] = _WorkerLine(state="waiting", detail="" if name in workers else "not sampled")
        self._refresh()

    def worker_phase(self, worker: str, phase: str, detail: str = "") -> None:
        line = self.lines.setdefault(worker, _WorkerLine())
        line.state, line.detail = phase, detail[:80]
        self._refresh()

    def worker_progress(self, worker: str, progress: pb.TrainProgress) -> None:
        line = self.lines.setdefault(worker, _WorkerLine())
        line.batches_done, line.batches_total = progress.batches_done, progress.batches_total
        if progress.batches_done:
            line.loss = progress.mean_loss
        if progress.seconds > 0:
            line.samples_per_second = progress.batches_done * self.batch_size / progress.seconds
        self._refresh()

    def round_finished(self, report: RoundReport) -> None:
        self.bar.advance(self.task)
        self.print_round(report)
        self._refresh()

    def round_failed(self, number: int, reason: str) -> None:
        self.console.print(Text(f"round {number} failed: {reason}", style="red"))

    def run_finished(self) -> None:
        self.live.stop()
