"""The live view of a run on a terminal (rich): one line per worker inside the round, a bar over the rounds with its
ETA, and a row per finished round above them. Only used when stdout is a terminal; logs stay JSON elsewhere."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from coordinator_service.engine.observer import RunObserver
from coordinator_service.engine.rounds import RoundReport
from coordinator_service.observe.board import board_summary
from generated.fedpi.v1 import worker_pb2 as pb

_STYLES = {
    "waiting": "dim",
    "sending": "cyan",
    "training": "yellow",
    "receiving": "cyan",
    "done": "green",
    "dropped": "bold red",
}


@dataclass
class _WorkerLine:
    state: str = "waiting"
    detail: str = ""
    batches_done: int = 0
    batches_total: int = 0
    loss: float | None = None
    samples_per_second: float | None = None
    board: str = ""  # the board's temperature and trouble, from its last progress message


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
    SHOWN_EVENTS = frozenset(
        {"round_started", "round_finished", "worker_train_finished", "worker_dropped", "update_buffered"}
    )

    def __init__(self, batch_size: int, console: Console | None = None, rounds: int | None = None):
        self.batch_size = batch_size
        self.console = console or Console()
        self.lines: dict[str, _WorkerLine] = {}
        self.round = 0
        self.status = "starting: waiting for the workers"
        self.optimizer: tuple[str, float | None] | None = None  # the last round's server optimizer, and agreement
        # The ETA follows the rounds done so far however long they take (rich's default forgets after 30 s).
        self.bar = Progress(
            TextColumn("[bold]rounds"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            speed_estimate_period=7 * 86_400,
        )
        self.task = self.bar.add_task("rounds", total=rounds)
        self.live = Live(
            self._render(), console=self.console, refresh_per_second=4, transient=False, redirect_stdout=False
        )
        self._round_started = time.monotonic()

    def start(self) -> None:
        """Show the view now (the workers may take a while to start or answer), not only once training starts."""
        if not self.live.is_started:
            self.live.start()

    def log_file(self) -> _ConsoleFile:
        """A file for the log lines, printed above the live view instead of through it."""
        return _ConsoleFile(self.console)

    # -- the view ----------------------------------------------------------------------------------------------

    def _render(self) -> Group:
        table = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
        for column in ("worker", "state", "batches", "loss", "samples/s", "board"):
            # A long reason is cut short here (the log line above the view has it whole): 100 columns hold the table.
            table.add_column(
                column,
                justify="left" if column in ("worker", "state") else "right",
                **(
                    {"max_width": 48, "no_wrap": True, "overflow": "ellipsis"}
                    if column == "state"
                    else {"max_width": 20, "no_wrap": True, "overflow": "ellipsis"}
                ),
            )
        for name, line in self.lines.items():
            total = f"/{line.batches_total}" if line.batches_total else ""
            state = Text(line.state + (f" ({line.detail})" if line.detail else ""), style=_STYLES[line.state])
            table.add_row(
                name,
                state,
                f"{line.batches_done}{total}",
                f"{line.loss:.4f}" if line.loss is not None else "",
                f"{line.samples_per_second:.0f}" if line.samples_per_second else "",
                Text.from_markup(line.board),
            )
        header = Text(f"round {self.round}", style="bold") if self.round else Text(self.status, style="dim")
        return Group(self.bar, header, table)

    def _refresh(self) -> None:
        self.live.update(self._render())

    def print_round(self, event: dict) -> None:
        """A finished round's row (from its round_finished event), within 100 columns but for who was dropped."""
        workers = event.get("workers", {})
        moved = sum(w["bytes_sent"] + w["bytes_received"] for w in workers.values()) / 1e6
        missing = [f"{f['worker']} dropped ({f['phase']})" for f in event.get("failures", [])]
        missing += [f"{f['worker']} {f['phase']}" for f in event.get("absent", [])]
        if "test_accuracy" in event:
            scores = f"accuracy {event['test_accuracy']:6.2%}  loss {event['test_loss']:.4f}"
            if "dp_epsilon" in event:
                scores += f"  epsilon {event['dp_epsilon']:.2f}"
        elif "federated_accuracy" in event:
            scores = f"federated {event['federated_accuracy']:6.2%}  loss {event['federated_loss']:.4f}"
        else:
            scores = "not evaluated (no test data: --federated-evaluation)"
        unit = "version" if "version" in event else "round"  # asynchronous mode makes versions
        self.console.print(
            f"{unit} {event['round']:>3}  {scores}  wall {event['wall_seconds']:.2f} s  "
            f"overhead {event['overhead_seconds']:.2f} s  {moved:.1f} MB  {len(workers)} trained",
            highlight=False,
        )
        if missing:  # on a line of its own: the row stays within 100 columns
            self.console.print(f"{'':11}{', '.join(missing)}", highlight=False)
        self._print_optimizer_change(event)

    def _print_optimizer_change(self, event: dict) -> None:
        """auto's choice, on the first round it steps with (the round before measured the agreement it chose by)."""
        name = event.get("server_optimizer")
        if name is None:
            return
        if self.optimizer is not None and self.optimizer[0] != name:
            agreement = self.optimizer[1]
            why = f": round {event['round'] - 1}'s updates agreed {agreement:.2f}" if agreement is not None else ""
            self.console.print(f"{'':11}server optimizer {name} from this round{why}", highlight=False)
        self.optimizer = (name, event.get("update_agreement"))

    # -- hooks -------------------------------------------------------------------------------------------------

    def run_started(self, rounds: int, first_round: int, workers: Sequence[str]) -> None:
        self.bar.reset(self.task, total=rounds, completed=first_round - 1)
        self.lines = {w: _WorkerLine() for w in workers}
        self.status = "starting the first round"
        self.start()
        self._refresh()

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
        line.board = board_summary(progress.health, brief=True)
        self._refresh()

    def round_finished(self, report: RoundReport) -> None:
        self.finished(report.as_event())

    def finished(self, event: dict) -> None:
        self.bar.advance(self.task)
        self.print_round(event)
        if "version" in event:  # asynchronous: no round starts; the header names the newest version
            self.status = f"version {event['version']} made; every worker trains on"
        if event["round"] == self.round:  # not when the next round is already under way (its evaluation overlaps)
            for name in event.get("workers", {}):
                if name in self.lines:
                    self.lines[name].state, self.lines[name].detail = "done", ""
        self._refresh()

    def round_failed(self, number: int, reason: str) -> None:
        self.console.print(Text(f"round {number} failed: {reason}", style="red"))

    def run_finished(self) -> None:
        self.live.stop()


class EventView:
    """The same view fed by a run's events instead of the round loop's hooks: `fedpi runs watch` on a terminal, from
    what a `fedpi serve` sends (WatchRun)."""

    def __init__(self, batch_size: int = 0, rounds: int | None = None, console: Console | None = None):
        self.view = LiveProgress(batch_size=batch_size, console=console, rounds=rounds)
        self.view.status = "waiting for the run's first events"
        self.view.start()
        self.view._refresh()
        self._said: set[str] = set()

    def feed(self, event: dict) -> None:
        name, view = event.get("event"), self.view
        if name == "training_started":
            view.run_started(event["rounds"], event.get("first_round", 1), event.get("workers", []))
        elif name == "round_started":
            view.round_started(event["round"], event.get("workers", []))
            for worker in event.get("workers", []):
                view.worker_phase(worker, "sending")
        elif name == "worker_progress":
            progress = SimpleNamespace(
                **{k: event.get(k, 0) for k in ("batches_done", "batches_total", "mean_loss", "seconds")},
                health=_health(event.get("health")),
            )
            view.worker_phase(event["worker"], "training")
            view.worker_progress(event["worker"], progress)
        elif name == "worker_train_finished":
            view.worker_phase(event["worker"], "receiving")
            line = view.lines[event["worker"]]
            if event.get("seconds"):
                line.samples_per_second = event.get("samples", 0) / event["seconds"]
        elif name == "worker_dropped":
            view.worker_phase(event["worker"], "dropped", f"{event.get('phase')}: {event.get('reason')}")
        elif name == "round_finished":
            view.finished(event)
        elif name in ("round_retrying", "training_failed", "run_ended") or event.get("level") in ("warning", "error"):
            detail = event.get("reason") or event.get("state") or ""
            line = f"{name}{': ' + str(detail) if detail else ''}"
            if line not in self._said:  # a worker refused before every round is said once
                self._said.add(line)
                view.log_file().write(line + "\n")

    def close(self) -> None:
        self.view.run_finished()


def _health(fields: object) -> pb.BoardHealth:
    """A progress event's board health (as the server wrote it); anything else is no health at all."""
    from google.protobuf import json_format

    try:
        return json_format.ParseDict(fields or {}, pb.BoardHealth(), ignore_unknown_fields=True)
    except (json_format.ParseError, TypeError, AttributeError):
        return pb.BoardHealth()
