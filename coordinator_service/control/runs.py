"""The runs a long-running coordinator knows, kept under one directory so that a restart loses nothing:

    STATE_DIR/runs/RUN_ID/run.json        target, settings, state, times, progress (rewritten atomically and
                                          durably on every change)
    STATE_DIR/runs/RUN_ID/events.jsonl    every event of the run, as the structured log has it (read from disk by
                                          watchers, never all held in memory)
    STATE_DIR/runs/RUN_ID/...             what a run writes: metrics.jsonl, config.json, checkpoint.pt, model.pt
    STATE_DIR/unreadable/RUN_ID           a run whose record could not be read, moved aside at start-up

A run's directory is named by its id alone, which matches RUN_ID whole; nothing in a request names a path.

A run found TRAINING or QUEUED when the coordinator starts was cut short by a restart or crash: it becomes
INTERRUPTED, resumable from its checkpoint.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import structlog
import torch
from google.protobuf import json_format

from coordinator_service.control.runspec import RUN_ID
from coordinator_service.engine.training import ROUND_MODELS
from fedpi import durable
from fedpi.weights import serde
from generated.fedpi.v1 import coordinator_pb2 as cpb

log = structlog.get_logger()

STATES = {name.removeprefix("RUN_STATE_").lower(): value for name, value in cpb.RunState.items()}
ACTIVE = ("queued", "training")
RESUMABLE = ("failed", "stopped", "interrupted")
EVENTS = "events.jsonl"


class UnknownRun(Exception):
    """No run has this id."""


@dataclass
class RunRecord:
    run_id: str
    spec: dict  # the RunSpec as JSON (protobuf field names)
    state: str = "queued"
    rounds: int = 0
    round: int = 0
    last_round: dict | None = None  # the last round_finished event
    failures: list[dict] = field(default_factory=list)
    error: str = ""
    started_at: float = field(default_factory=time.time)
    ended_at: float = 0.0
    target: dict = field(default_factory=dict)  # the RunTarget it trains (runspec.RunTarget.as_dict)
    settings: dict = field(default_factory=dict)  # its resolved RunSettings, grouped; a resumed run keeps them
    away: list[dict] = field(default_factory=list)  # workers the run knows that take no part now, and why

    def to_proto(self, summary: bool = False) -> cpb.Run:
        last = self.last_round or {}
        # Every worker the run was told about: trained or dropped in the last round, or away and why.
        workers = [cpb.WorkerStatus(name=name, state="trained") for name in last.get("workers", {})]
        workers += [
            cpb.WorkerStatus(name=f["worker"], state="dropped", reason=f"{f['phase']}: {f['reason']}")
            for f in last.get("failures", [])
        ]
        shown = {w.name for w in workers}
        workers += [
            cpb.WorkerStatus(name=f["worker"], state=f["phase"], reason=f["reason"])
            for f in self.away
            if f["worker"] not in shown
        ]
        run = cpb.Run(
            run_id=self.run_id,
            state=STATES[self.state],
            round=self.round,
            rounds=self.rounds,
            test_accuracy=last.get("test_accuracy", 0.0),
            test_loss=last.get("test_loss", 0.0),
            workers=workers,
            error=self.error,
            started_at=self.started_at,
            ended_at=self.ended_at,
            resumable=self.state in RESUMABLE,
        )
        if not summary:
            run.spec.CopyFrom(json_format.ParseDict(self.spec, cpb.RunSpec(), ignore_unknown_fields=True))
            run.last_round_json = json.dumps(last) if last else ""
            run.failures.extend(cpb.Failure(**f) for f in self.failures)
            run.settings_json = json.dumps(self.settings) if self.settings else ""
        return run


class RunLog:
    """One run's record and events, on disk. Events are appended as they happen and read back from the file by
    whoever watches; only their count is kept here."""

    def __init__(self, directory: Path, record: RunRecord):
        self.directory = directory
        self.record = record
        self.events_path = directory / EVENTS
        self._lock = threading.Lock()  # events also arrive from worker threads
        self.count = _recover_events(self.events_path)

    @property
    def ended(self) -> bool:
        return self.record.state not in ACTIVE

    def save(self) -> None:
        durable.write_text(self.directory / "run.json", json.dumps(asdict(self.record), indent=2) + "\n")

    def add_event(self, event: dict) -> None:
        with self._lock:
            self.count += 1
            line = json.dumps({"sequence": self.count, **event}, default=str) + "\n"
            with self.events_path.open("a", encoding="utf-8") as f:
                f.write(line)

    def end_offset(self) -> int:
        try:
            return self.events_path.stat().st_size
        except FileNotFoundError:
            return 0

    def read_events(self, offset: int) -> tuple[list[dict], int]:
        """The whole events written from byte `offset` on, and the offset after the last of them."""
        try:
            with self.events_path.open("rb") as f:
                f.seek(offset)
                data = f.read(1 << 20)  # a watcher takes at most 1 MiB of events a read
        except FileNotFoundError:
            return [], offset
        end = data.rfind(b"\n") + 1
        events = []
        for line in data[:end].splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue  # an unreadable line (from before a crash) is skipped, as at start-up
        return events, offset + end


def _recover_events(path: Path) -> int:
    """The number of the last event in `path`. A torn last line (a power cut, an OOM kill) is cut off, with a warning:
    it holds no whole event, and the next one must start on a line of its own."""
    if not path.is_file():
        return 0
    last, good_end, bad = 0, 0, 0
    with path.open("rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            good_end += len(line)
            try:
                last = int(json.loads(line)["sequence"])
            except (ValueError, KeyError, TypeError):
                bad += 1
    size = path.stat().st_size
    if good_end < size:
        log.warning(
            "events_torn_line_dropped",
            file=str(path),
            bytes=size - good_end,
            hint="the coordinator stopped while writing this event; the events before it are kept",
        )
        with path.open("r+b") as f:
            f.truncate(good_end)
    if bad:
        log.warning("events_unreadable_lines_skipped", file=str(path), lines=bad)
    return last


class RunStore:
    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.root = self.state_dir / "runs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs: dict[str, RunLog] = {}
        self.unreadable: list[str] = []
        for directory in sorted(p for p in self.root.iterdir() if p.is_dir()):
            try:
                run_log = self._load(directory)
            except (OSError, ValueError, TypeError, KeyError) as exc:
                self._move_aside(directory, exc)
                continue
            self.logs[run_log.record.run_id] = run_log

    def _load(self, directory: Path) -> RunLog:
        record = RunRecord(**json.loads((directory / "run.json").read_text(encoding="utf-8")))
        if record.run_id != directory.name or not RUN_ID.fullmatch(record.run_id) or record.state not in STATES:
            raise ValueError(f"run.json names run {record.run_id!r} in state {record.state!r}")
        run_log = RunLog(directory, record)
        if record.state in ACTIVE:  # the coordinator went away while it trained
            record.state, record.ended_at = "interrupted", time.time()
            record.error = (
                "the coordinator stopped while this run trained (restart or crash); `fedpi runs resume` continues it"
            )
            run_log.save()
        return run_log

    def _move_aside(self, directory: Path, exc: Exception) -> None:
        aside = self.state_dir / "unreadable"
        aside.mkdir(exist_ok=True)
        target, n = aside / directory.name, 1
        while target.exists():
            n += 1
            target = aside / f"{directory.name}-{n}"
        directory.rename(target)
        durable.fsync_directory(self.root)
        self.unreadable.append(directory.name)
        log.warning(
            "run_unreadable",
            run_dir=str(directory),
            moved_to=str(target),
            reason=f"{type(exc).__name__}: {exc}"[:500],
            hint="the run's files are kept there; the coordinator carries on without it",
        )

    def new_id(self) -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        run_id, n = stamp, 1
        while run_id in self.logs or (self.root / run_id).exists():
            n += 1
            run_id = f"{stamp}-{n}"
        return run_id

    def create(self, record: RunRecord) -> RunLog:
        run_id = record.run_id
        if not RUN_ID.fullmatch(run_id):
            raise ValueError(f"run_id {run_id!r}: use 1-64 letters, digits, '.', '_' or '-' (not first)")
        if run_id in self.logs:
            raise FileExistsError(
                f"run {run_id} exists; `fedpi runs resume {run_id}` continues it, or choose another run id"
            )
        directory = self.root / run_id
        directory.mkdir()  # a new directory, or FileExistsError: a run never takes over what is there
        durable.fsync_directory(self.root)
        run_log = RunLog(directory, record)
        run_log.save()
        self.logs[run_id] = run_log
        return run_log

    def get(self, run_id: str) -> RunLog:
        if run_id not in self.logs:
            known = ", ".join(sorted(self.logs)[-5:]) or "none yet"
            raise UnknownRun(
                f"no run {run_id[:80]!r} on this coordinator (latest: {known}); `fedpi runs list` shows them all"
            )
        return self.logs[run_id]

    def newest_first(self) -> list[RunLog]:
        return sorted(self.logs.values(), key=lambda log: (log.record.started_at, log.record.run_id), reverse=True)

    def page(self, size: int, after: str = "") -> tuple[list[RunLog], str]:
        """`size` runs, newest first, starting after run `after`; and the token of the next page ("" at the end)."""
        runs = self.newest_first()
        start = 0
        if after:
            ids = [r.record.run_id for r in runs]
            if after not in ids:
                raise ValueError(f"page_token {after[:80]!r} names no run on this coordinator; start without one")
            start = ids.index(after) + 1
        page = runs[start : start + size]
        more = start + size < len(runs)
        return page, page[-1].record.run_id if page and more else ""

    def retain(self, keep: int) -> list[str]:
        """Delete all but the `keep` newest finished runs (0: keep them all); the ids removed."""
        if keep <= 0:
            return []
        finished = [r for r in self.newest_first() if r.record.state == "finished"]
        removed = []
        for run_log in finished[keep:]:
            shutil.rmtree(run_log.directory, ignore_errors=True)
            del self.logs[run_log.record.run_id]
            removed.append(run_log.record.run_id)
        if removed:
            durable.fsync_directory(self.root)
            log.info("runs_removed", runs=removed, kept=keep, reason="--keep-runs")
        return removed


def model_of(run_log: RunLog, round: int) -> serde.WeightsPayload:
    """The run's global model: after `round`, or the latest (the final model of a finished run)."""
    directory, record = run_log.directory, run_log.record
    architecture = (
        json.loads((directory / "config.json").read_text())["model"] if (directory / "config.json").is_file() else ""
    )
    if round == 0 and record.state == "finished" and (directory / "model.pt").is_file():
        return serde.WeightsPayload(
            torch.load(directory / "model.pt", weights_only=True), round=record.round, architecture=architecture
        )
    if round == 0 and (directory / "checkpoint.pt").is_file():
        ckpt = torch.load(directory / "checkpoint.pt", weights_only=True)
        return serde.WeightsPayload(ckpt["state_dict"], round=ckpt["round"], architecture=architecture)
    path = directory / ROUND_MODELS / f"round-{round}.pt"
    if round and path.is_file():
        return serde.WeightsPayload(torch.load(path, weights_only=True), round=round, architecture=architecture)
    kept = sorted(int(p.stem.split("-")[1]) for p in (directory / ROUND_MODELS).glob("round-*.pt"))
    raise UnknownRun(
        f"run {run_log.record.run_id} has no model for round {round or 'latest'}: "
        + (f"rounds kept: {', '.join(map(str, kept))} (and 0 for the latest)" if kept else "no round has completed yet")
    )
