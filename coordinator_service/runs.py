"""The runs a long-running coordinator knows, kept under one directory so that a restart loses nothing:

    STATE_DIR/runs/RUN_ID/run.json        spec, state, times, progress (rewritten atomically on every change)
    STATE_DIR/runs/RUN_ID/events.jsonl    every event of the run, as the structured log has it
    STATE_DIR/runs/RUN_ID/...             what `train` writes: metrics.jsonl, config.json, checkpoint.pt, model.pt

A run found TRAINING or QUEUED when the coordinator starts was cut short by a restart or crash: it becomes
INTERRUPTED, resumable from its checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from google.protobuf import json_format

from generated.fedpi.v1 import coordinator_pb2 as cpb

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
STATES = {name.removeprefix("RUN_STATE_").lower(): value for name, value in cpb.RunState.items()}
ACTIVE = ("queued", "training")
RESUMABLE = ("failed", "stopped", "interrupted")


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

    def to_proto(self) -> cpb.Run:
        last = self.last_round or {}
        workers = [cpb.WorkerStatus(name=name, state="trained") for name in last.get("workers", {})]
        workers += [cpb.WorkerStatus(name=f["worker"], state="dropped", reason=f"{f['phase']}: {f['reason']}")
                    for f in last.get("failures", [])]
        return cpb.Run(
            run_id=self.run_id, state=STATES[self.state], spec=json_format.ParseDict(self.spec, cpb.RunSpec()),
            round=self.round, rounds=self.rounds, test_accuracy=last.get("test_accuracy", 0.0),
            test_loss=last.get("test_loss", 0.0), last_round_json=json.dumps(last) if last else "", workers=workers,
            failures=[cpb.Failure(**f) for f in self.failures], error=self.error, started_at=self.started_at,
            ended_at=self.ended_at, resumable=self.state in RESUMABLE)


class RunLog:
    """One run's record and events, on disk and for whoever watches."""

    def __init__(self, directory: Path, record: RunRecord):
        self.directory = directory
        self.record = record
        self.events: list[dict] = []
        events = directory / "events.jsonl"
        if events.is_file():
            self.events = [json.loads(line) for line in events.read_text().splitlines() if line.strip()]

    @property
    def ended(self) -> bool:
        return self.record.state not in ACTIVE

    def save(self) -> None:
        path = self.directory / "run.json"
        tmp = path.with_name("run.json.tmp")
        tmp.write_text(json.dumps(asdict(self.record), indent=2) + "\n")
        os.replace(tmp, path)

    def add_event(self, event: dict) -> None:
        """Called from the logging pipeline (also on worker threads: appends are atomic); watchers poll."""
        event = {"sequence": len(self.events) + 1, **event}
        self.events.append(event)
        with (self.directory / "events.jsonl").open("a") as f:
            f.write(json.dumps(event, default=str) + "\n")


class RunStore:
    def __init__(self, state_dir: Path):
        self.root = Path(state_dir) / "runs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs: dict[str, RunLog] = {}
        for path in sorted(self.root.glob("*/run.json")):
            record = RunRecord(**json.loads(path.read_text()))
            log = RunLog(path.parent, record)
            if record.state in ACTIVE:  # the coordinator went away while it trained
                record.state, record.ended_at = "interrupted", time.time()
                record.error = "the coordinator stopped while this run trained (restart or crash); ResumeRun continues it"
                log.save()
            self.logs[record.run_id] = log

    def new_id(self) -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        run_id, n = stamp, 1
        while run_id in self.logs:
            n += 1
            run_id = f"{stamp}-{n}"
        return run_id

    def create(self, run_id: str, spec: dict, rounds: int) -> RunLog:
        if not RUN_ID.match(run_id):
            raise ValueError(f"run id {run_id!r}: use 1-64 letters, digits, '.', '_' or '-' (not first)")
        if run_id in self.logs:
            raise FileExistsError(f"run {run_id} exists; ResumeRun continues it, or choose another run_id")
        directory = self.root / run_id
        directory.mkdir(parents=True, exist_ok=True)
        log = RunLog(directory, RunRecord(run_id=run_id, spec=spec, rounds=rounds))
        log.save()
        self.logs[run_id] = log
        return log

    def get(self, run_id: str) -> RunLog:
        if run_id not in self.logs:
            known = ", ".join(sorted(self.logs)[-5:]) or "none yet"
            raise UnknownRun(f"no run {run_id!r} on this coordinator (latest: {known}); ListRuns shows them all")
        return self.logs[run_id]

    def newest_first(self) -> list[RunLog]:
        return sorted(self.logs.values(), key=lambda log: log.record.started_at, reverse=True)
