"""`coordinator serve`: the coordinator as a long-running gRPC service (fedpi.v1.Coordinator). Operators start,
watch, stop and resume training runs and fetch their models; each run is a `train` run, with the same flags and
the same code, in its own directory under --state-dir (see coordinator_service.control.runs).

One run trains at a time: the workers hold one model each. A StartRun while a run trains is refused with ABORTED,
naming that run, rather than queued: the operator decides whether to stop it or wait.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace

import grpc
import structlog
import torch
from google.protobuf import json_format

from coordinator_service import settings as run_settings
from coordinator_service.control import launch, runspec
from coordinator_service.control.runs import RESUMABLE, RunLog, RunRecord, RunStore, UnknownRun
from coordinator_service.control.runspec import InvalidSpec, NotAllowed, RunTarget, WorkerPolicy
from coordinator_service.engine.checkpoint import CheckpointMismatch
from coordinator_service.engine.discovery import DiscoveryFailed
from coordinator_service.engine.observer import Observers, RunObserver
from coordinator_service.engine.rounds import RoundFailed
from coordinator_service.engine.training import ROUND_MODELS, HandshakeFailed, RunStopped
from fedpi.data import DATASETS, DatasetUnavailable
from fedpi.logs import add_sink, remove_sink
from fedpi.mnist_task import MnistTask
from fedpi.models import MODELS
from fedpi.net import server as grpc_server
from fedpi.net.auth import AuthInterceptor, ServerSecurity
from fedpi.net.ports import listen
from fedpi.task import TaskError, task_class
from fedpi.weights import serde
from generated.fedpi.v1 import coordinator_pb2 as cpb
from generated.fedpi.v1 import coordinator_pb2_grpc as cpb_grpc
from generated.fedpi.v1 import worker_pb2 as pb

log = structlog.get_logger()

SERVICE = cpb.DESCRIPTOR.services_by_name["Coordinator"].full_name
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
MAX_REQUEST_BYTES = 1 << 20  # a RunSpec is a few hundred bytes; nothing the API takes needs more
DEFAULT_PAGE, MAX_PAGE = 50, 500

Launch = Callable[..., Awaitable[None]]


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
        run_log = self.store.get(run_id)
        directory, record = run_log.directory, run_log.record
        architecture = (
            json.loads((directory / "config.json").read_text())["model"]
            if (directory / "config.json").is_file()
            else ""
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
            f"run {run_id} has no model for round {round or 'latest'}: "
            + (
                f"rounds kept: {', '.join(map(str, kept))} (and 0 for the latest)"
                if kept
                else "no round has completed yet"
            )
        )


# What each refusal is, most specific first.
REFUSALS = (
    (UnknownRun, grpc.StatusCode.NOT_FOUND),
    (Busy, grpc.StatusCode.ABORTED),
    (NotNow, grpc.StatusCode.FAILED_PRECONDITION),
    (FileExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (NotAllowed, grpc.StatusCode.PERMISSION_DENIED),
    (TooMany, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (InvalidSpec, grpc.StatusCode.INVALID_ARGUMENT),
    (TaskError, grpc.StatusCode.INVALID_ARGUMENT),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
)


class CoordinatorServicer(cpb_grpc.CoordinatorServicer):
    def __init__(self, manager: RunManager):
        self.manager = manager

    async def _abort(self, context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
        code = next((code for kind, code in REFUSALS if isinstance(exc, kind)), None)
        message = str(exc)
        if code is None:  # a bug: the log has the traceback, the caller a message without internals
            code, message = grpc.StatusCode.INTERNAL, f"internal error in {method}; the coordinator's log has details"
            log.exception("request_failed", method=method)
        log.warning("request_rejected", method=method, code=code.name, reason=message, peer=context.peer())
        await context.abort(code, message)

    async def StartRun(self, request, context):
        try:
            return (await self.manager.start(request)).record.to_proto()
        except Exception as exc:
            await self._abort(context, exc, "StartRun")

    async def GetRun(self, request, context):
        try:
            return self.manager.store.get(request.run_id).record.to_proto()
        except Exception as exc:
            await self._abort(context, exc, "GetRun")

    async def ListRuns(self, request, context):
        try:
            if not 0 <= request.page_size <= MAX_PAGE:
                raise ValueError(
                    f"page_size = {request.page_size}: allowed 0 (the default, {DEFAULT_PAGE}) to {MAX_PAGE}"
                )
            page, next_token = self.manager.store.page(request.page_size or DEFAULT_PAGE, request.page_token)
        except Exception as exc:
            await self._abort(context, exc, "ListRuns")
            return
        return cpb.Runs(
            runs=[run_log.record.to_proto(summary=True) for run_log in page],
            next_page_token=next_token,
            warning=self.manager.config.warning,
        )

    async def WatchRun(self, request, context):
        try:
            async for event in self.manager.watch(request.run_id, request.from_start):
                yield cpb.RunEvent(
                    run_id=request.run_id,
                    sequence=event["sequence"],
                    event=str(event.get("event")),
                    json=json.dumps(event, default=str),
                )
        except Exception as exc:
            await self._abort(context, exc, "WatchRun")

    async def StopRun(self, request, context):
        try:
            return self.manager.stop(request.run_id, request.abandon_round).record.to_proto()
        except Exception as exc:
            await self._abort(context, exc, "StopRun")

    async def ResumeRun(self, request, context):
        try:
            return self.manager.resume(request.run_id).record.to_proto()
        except Exception as exc:
            await self._abort(context, exc, "ResumeRun")

    async def GetModel(self, request, context):
        try:
            payload = await asyncio.to_thread(self.manager.model, request.run_id, request.round)
        except Exception as exc:
            await self._abort(context, exc, "GetModel")
            return
        chunk_size = request.chunk_size or serde.DEFAULT_CHUNK_BYTES
        if not 1024 <= chunk_size <= serde.DEFAULT_MAX_CHUNK_BYTES:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"chunk_size must be between 1024 and {serde.DEFAULT_MAX_CHUNK_BYTES} bytes",
            )
        for chunk in payload.chunks(chunk_size, pb.CHUNK_ENCODING_RAW):
            yield chunk


async def serve(
    manager: RunManager, address: str, security: ServerSecurity, grace: float = 30.0, max_concurrent_rpcs: int = 64
) -> None:
    # One process per port (no SO_REUSEPORT: a second server on a taken port fails instead of sharing it), bounded
    # requests, and a bound on calls at once (more are RESOURCE_EXHAUSTED).
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(security)],
        maximum_concurrent_rpcs=max_concurrent_rpcs,
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", MAX_REQUEST_BYTES)],
    )
    cpb_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(manager), server)
    health_servicer = grpc_server.add_health_and_reflection(server, (SERVICE,))
    port = listen(server, address, security.credentials() if security.tls else None)
    await grpc_server.start([server], health_servicer, (SERVICE,))
    interrupted = [r.run_id for r in (log.record for log in manager.store.logs.values()) if r.state == "interrupted"]
    log.info(
        "coordinator_serving",
        address=address,
        port=port,
        state_dir=str(manager.store.state_dir),
        runs=len(manager.store.logs),
        interrupted=interrupted,
        unreadable=manager.store.unreadable,
        tls=security.tls,
        mutual_tls=security.client_ca_file is not None,
        token=security.token is not None,
        workers_allowed=manager.config.workers.describe(),
        tasks_allowed=sorted(manager.config.allowed_tasks),
    )
    if manager.config.warning:
        log.warning("coordinator_insecure", warning=manager.config.warning)
    try:
        await grpc_server.until_signalled()
    finally:
        log.info("coordinator_stopping")
        await grpc_server.stop([server], health_servicer, grace, before=manager.interrupt)
        manager.close()
