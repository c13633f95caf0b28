"""The runs of `fedpi serve`: what the server allows a run (ServerRuns), and the RunManager that prepares, starts,
watches, stops and resumes them, one at a time, each in its own directory of the run store. No gRPC here: the
service (control.service) maps the exceptions below to status codes."""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace

import structlog
from google.protobuf import json_format

from coordinator_service import settings as run_settings
from coordinator_service.control import launch, runspec
from coordinator_service.control.runs import RESUMABLE, RunLog, RunRecord, RunStore, model_of
from coordinator_service.control.runspec import InvalidSpec, NotAllowed, RunTarget, WorkerPolicy
from coordinator_service.engine.checkpoint import CheckpointMismatch
from coordinator_service.engine.discovery import DiscoveryFailed
from coordinator_service.engine.observer import Observers, RunObserver
from coordinator_service.engine.rounds import RoundFailed
from coordinator_service.engine.training import HandshakeFailed, RunStopped
from fedpi.data import DATASETS, DatasetUnavailable
from fedpi.logs import add_sink, remove_sink
from fedpi.mnist_task import MnistTask
from fedpi.models import MODELS
from fedpi.task import TaskError, task_class
from fedpi.weights import serde
from generated.fedpi.v1 import coordinator_pb2 as cpb

log = structlog.get_logger()

Launch = Callable[..., Awaitable[None]]  # how a run is trained: control.launch.train, or a stand-in in tests

# Failures a run can meet in the field (workers away, data missing): its state says why, without a traceback.
EXPECTED_FAILURES = (
    ValueError,
    OSError,
    HandshakeFailed,
    RoundFailed,
    DiscoveryFailed,
    CheckpointMismatch,
    TaskError,
    DatasetUnavailable,
)


class Busy(Exception):
    """Another run is training."""


class NotNow(Exception):
    """The run is not in a state that allows this (not training, not resumable)."""


class TooMany(Exception):
    """A bound of the service (watchers) is reached."""


@dataclass(frozen=True)
class ServerRuns:
    """The operator's choices for every run of this server: defaults a request may override (what to train, which
    workers, the run settings of the server's environment) and bounds it may not cross (tasks and worker hosts
    allowed, workers per run). `place` is where and how runs work; its output_dir is each run's own directory."""

    place: launch.RunPlace
    defaults: RunTarget = RunTarget()
    preset: str = "default"
    layer: dict = field(default_factory=dict)  # run settings from the server's FEDPI_* variables
    allowed_tasks: frozenset[str] = frozenset()
    workers: WorkerPolicy = runspec.LOOPBACK
    max_workers: int = 64
    keep_runs: int = 0
    max_watchers: int = 16
    warning: str = ""  # shown in ListRuns when the server runs without authentication beyond loopback


@dataclass
class ActiveRun:
    log: RunLog
    task: asyncio.Task
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    ending: str = ""  # "stopped" or "interrupted" when the task is cancelled on purpose


class RunProgress(RunObserver):
    """Keeps a run's record (run.json) up to date as rounds finish, and adds the workers' training progress to its
    events (the log has no line for those: a worker reports every 2 s)."""

    def __init__(self, run_log: RunLog):
        self.log = run_log
        self.round = 0

    def round_started(self, number, workers):
        self.round = number

    def worker_progress(self, worker, progress):
        self.log.add_event(
            {
                "event": "worker_progress",
                "round": self.round,
                "worker": worker,
                "batches_done": progress.batches_done,
                "batches_total": progress.batches_total,
                "mean_loss": round(progress.mean_loss, 4),
                "seconds": round(progress.seconds, 3),
                "heartbeat": progress.heartbeat,
                "health": json_format.MessageToDict(progress.health, preserving_proto_field_name=True),
                "timestamp": datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z"),
            }
        )

    def run_started(self, rounds, first_round, workers):
        self.log.record.rounds, self.log.record.round = rounds, first_round - 1
        self.log.save()

    def workers_away(self, away):
        record = self.log.record
        now = [{"worker": f.worker, "phase": f.phase, "reason": f.reason} for f in away]
        if now != record.away:
            record.away = now
            self.log.save()

    def round_finished(self, report):
        record = self.log.record
        record.round, record.last_round = report.round, report.as_event()
        record.failures += [
            {"round": report.round, "worker": f.worker, "phase": f.phase, "reason": f.reason}
            for f in [*report.failures, *report.absent]
        ]
        self.log.save()

    def round_failed(self, number, reason):
        self.log.record.failures.append({"round": number, "worker": "", "phase": "round", "reason": reason})
        self.log.save()


def _import_task(target: RunTarget) -> None:
    """Import an allowed task's class, in a worker thread: whatever its module does on import (SystemExit included)
    becomes a TaskError, never the service's end. Then check the built-in task's model and dataset names."""
    try:
        cls = task_class(target.task)
    except BaseException as exc:  # noqa: BLE001 - an import may raise anything, and must not end the server
        if isinstance(exc, TaskError):
            raise
        raise TaskError(f"task {target.task!r} cannot be loaded: {type(exc).__name__} while importing it") from None
    if issubclass(cls, MnistTask):
        if target.model and target.model not in MODELS:
            raise InvalidSpec(f"model = {target.model!r}: the {target.task} task's models are {', '.join(MODELS)}")
        if target.dataset and target.dataset not in DATASETS:
            raise InvalidSpec(
                f"dataset = {target.dataset!r}: the {target.task} task's datasets are {', '.join(DATASETS)}"
            )


class RunManager:
    """Runs, one at a time, as asyncio tasks of this process; their records and events in the store."""

    def __init__(
        self, store: RunStore, config: ServerRuns, launch_run: Launch = launch.train, observers: list[RunObserver] = ()
    ):
        self.store = store
        self.config = config
        self.launch = launch_run
        self.observers = list(observers)
        self.active: ActiveRun | None = None
        self.watchers = 0
        add_sink(self._sink)

    def close(self) -> None:
        remove_sink(self._sink)

    def _sink(self, event: dict) -> None:
        run_id = event.pop("run", None)  # bound in the run's task: every event of the run carries it
        if run_id in self.store.logs:
            self.store.logs[run_id].add_event(event)

    # -- a request, checked whole before anything is created ---------------------------------------------------

    def _check_task(self, name: str) -> None:
        if name not in self.config.allowed_tasks:
            raise NotAllowed(
                f"task {name!r} is not allowed on this coordinator; allowed: "
                f"{', '.join(sorted(self.config.allowed_tasks))} (the operator adds tasks with "
                f"`fedpi serve --allow-task`, or by installing them)"
            )

    def prepare(self, spec: cpb.RunSpec) -> tuple[str, RunTarget, run_settings.RunSettings]:
        """The run a spec asks for: its id, target and settings; InvalidSpec, SettingsError or NotAllowed else."""
        run_id = runspec.run_id_of(spec)
        if run_id in self.store.logs:
            raise FileExistsError(
                f"run {run_id} exists; `fedpi runs resume {run_id}` continues it, or choose another run id"
            )
        target = runspec.target_of(spec).with_defaults(self.config.defaults).checked(self.config.max_workers)
        self._check_task(target.task)
        self.config.workers.check(target)
        preset = runspec.preset_of(spec) or self.config.preset
        settings = run_settings.merge(
            run_settings.preset_layer(preset), self.config.layer, runspec.settings_layer(spec)
        )
        launch.min_workers(settings, target.worker_count)  # a quorum the workers named can never meet
        return run_id or self.store.new_id(), target, settings

    # -- operations -------------------------------------------------------------------------------------------

    def _refuse_if_busy(self) -> None:
        if self.active is not None:
            run = self.active.log.record
            raise Busy(
                f"run {run.run_id} is training (round {run.round} of {run.rounds}); one run trains at a time: "
                f"stop it (`fedpi runs stop {run.run_id}`) or wait until it ends"
            )

    async def start(self, spec: cpb.RunSpec) -> RunLog:
        self._refuse_if_busy()
        run_id, target, settings = self.prepare(spec)
        await asyncio.to_thread(_import_task, target)
        self._refuse_if_busy()  # another StartRun may have started a run while the task loaded
        spec_json = json_format.MessageToDict(spec, preserving_proto_field_name=True)
        run_log = self.store.create(
            RunRecord(
                run_id=run_id,
                spec=spec_json,
                rounds=settings.rounds,
                target=target.as_dict(),
                settings=settings.model_dump(),
            )
        )
        self._launch(run_log, target, settings, resume=False)
        return run_log

    def resume(self, run_id: str) -> RunLog:
        run_log = self.store.get(run_id)
        if run_log.record.state not in RESUMABLE:
            raise NotNow(f"run {run_id} is {run_log.record.state}; only {', '.join(RESUMABLE)} runs resume")
        self._refuse_if_busy()
        record = run_log.record
        if record.target and record.settings:  # the run's own settings, whatever the server's defaults are now
            target = RunTarget.from_dict(record.target)
            settings = run_settings.RunSettings.model_validate(record.settings)
        else:  # a run recorded before settings were kept: its spec, read as a new one would be
            _, target, settings = self.prepare(
                json_format.ParseDict({**record.spec, "run_id": ""}, cpb.RunSpec(), ignore_unknown_fields=True)
            )
        self._check_task(target.task)
        self.config.workers.check(target)
        record.error, record.ended_at = "", 0.0
        self._launch(run_log, target, settings, resume=True)
        return run_log

    def stop(self, run_id: str, abandon_round: bool) -> RunLog:
        run_log = self.store.get(run_id)
        if self.active is None or self.active.log is not run_log:
            raise NotNow(f"run {run_id} is {run_log.record.state}, not training: nothing to stop")
        log.info("run_stop_requested", run_id=run_id, abandon_round=abandon_round)
        if abandon_round:
            self.active.ending = "stopped"
            self.active.task.cancel()
        else:
            self.active.stop.set()
        return run_log

    async def interrupt(self) -> None:
        """The server is going away: cut the active run short, marked interrupted (resumable)."""
        if self.active is not None:
            active = self.active
            active.ending = "interrupted"
            active.task.cancel()
            await asyncio.gather(active.task, return_exceptions=True)

    def _launch(self, run_log: RunLog, target: RunTarget, settings: run_settings.RunSettings, resume: bool) -> None:
        run_log.record.state = "training"
        run_log.save()
        stop = asyncio.Event()
        place = replace(self.config.place, output_dir=run_log.directory)
        task = asyncio.get_running_loop().create_task(self._execute(run_log, target, settings, place, stop, resume))
        self.active = ActiveRun(run_log, task, stop)

    async def _execute(
        self,
        run_log: RunLog,
        target: RunTarget,
        settings: run_settings.RunSettings,
        place: launch.RunPlace,
        stop: asyncio.Event,
        resume: bool,
    ) -> None:
        record = run_log.record
        structlog.contextvars.bind_contextvars(run=record.run_id)
        log.info(
            "run_started",
            run_id=record.run_id,
            resume=resume,
            task=target.task,
            settings=run_settings.changed(settings),
        )
        state, error = "finished", ""
        try:
            await self.launch(target, settings, place, Observers([RunProgress(run_log), *self.observers]), stop, resume)
        except RunStopped as exc:
            state, error = "stopped", str(exc)
        except asyncio.CancelledError:
            state = self.active.ending or "interrupted"
            error = (
                "stopped at once on request: the round in progress was abandoned; the last completed round is "
                "checkpointed"
                if state == "stopped"
                else "the coordinator stopped while this run trained"
            )
        except Exception as exc:  # every failure ends the run, with its reason; the server carries on
            state, error = "failed", str(exc) or type(exc).__name__
            if not isinstance(exc, EXPECTED_FAILURES):
                log.exception("run_crashed")
        finally:
            record.state, record.error, record.ended_at = state, error, time.time()
            run_log.save()
            log.info("run_ended", run_id=record.run_id, state=state, round=record.round, reason=error or None)
            self.active = None
            self.store.retain(self.config.keep_runs)

    async def watch(self, run_id: str, from_start: bool) -> AsyncIterator[dict]:
        """The run's events, read from its file as they are written; the stream ends with the run."""
        run_log = self.store.get(run_id)
        if self.watchers >= self.config.max_watchers:
            raise TooMany(
                f"{self.watchers} WatchRun streams are open, the most this coordinator serves at once; "
                f"close one, or try again later"
            )
        self.watchers += 1
        try:
            offset = 0 if from_start else run_log.end_offset()
            while True:
                ended = run_log.ended  # read before the events: the last ones are written before the run ends
                events, offset = run_log.read_events(offset)
                for event in events:
                    yield event
                if not events:
                    if ended:
                        return
                    await asyncio.sleep(0.2)
        finally:
            self.watchers -= 1

    def model(self, run_id: str, round: int) -> serde.WeightsPayload:
        """The run's global model: after `round`, or the latest (the final model of a finished run)."""
        return model_of(self.store.get(run_id), round)


# What each refusal is, most specific first.
