"""`coordinator serve`: the coordinator as a long-running gRPC service (fedpi.v1.Coordinator). Operators start,
watch, stop and resume training runs and fetch their models; each run is a `train` run, with the same flags and
the same code, in its own directory under --state-dir (see coordinator_service.runs).

One run trains at a time: the workers hold one model each. A StartRun while a run trains is refused with ABORTED,
naming that run, rather than queued: the operator decides whether to stop it or wait.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import io
import json
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog
import torch
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coordinator_service.observe import Observers, RunObserver
from coordinator_service.runs import RESUMABLE, RunLog, RunStore, UnknownRun
from coordinator_service.training import ROUND_MODELS, RunStopped
from fedpi import serde
from fedpi.auth import AuthInterceptor, ServerSecurity
from fedpi.logs import add_sink, remove_sink
from fedpi.task import TaskError, task_class
from generated.fedpi.v1 import coordinator_pb2 as cpb
from generated.fedpi.v1 import coordinator_pb2_grpc as cpb_grpc
from generated.fedpi.v1 import worker_pb2 as pb

log = structlog.get_logger()

SERVICE = cpb.DESCRIPTOR.services_by_name["Coordinator"].full_name
# Flags a RunSpec may not set: where results go and how the coordinator proves itself are the server's business
# (never secrets in a request), and the spec's own fields say the rest.
SERVER_ONLY = frozenset({
    "token-file", "tls-ca", "tls-cert", "tls-key", "tls-server-name", "output-dir", "latest-link", "resume",
    "log-format", "metrics-port", "metrics-host", "keep-round-models", "data-dir", "no-download", "threads",
    "task", "model", "dataset", "rounds", "workers", "workers-dns", "expect-workers", "preset", "help",
})

Launch = Callable[[argparse.Namespace, RunObserver, asyncio.Event], Awaitable[None]]


class Busy(Exception):
    """Another run is training."""


class NotNow(Exception):
    """The run is not in a state that allows this (not training, not resumable)."""


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
        self.log.add_event({
            "event": "worker_progress", "round": self.round, "worker": worker, "batches_done": progress.batches_done,
            "batches_total": progress.batches_total, "mean_loss": round(progress.mean_loss, 4),
            "seconds": round(progress.seconds, 3), "heartbeat": progress.heartbeat,
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")})

    def run_started(self, rounds, first_round, workers):
        self.log.record.rounds, self.log.record.round = rounds, first_round - 1
        self.log.save()

    def round_finished(self, report):
        record = self.log.record
        record.round, record.last_round = report.round, report.as_event()
        record.failures += [{"round": report.round, "worker": f.worker, "phase": f.phase, "reason": f.reason}
                            for f in report.failures]
        self.log.save()

    def round_failed(self, number, reason):
        self.log.record.failures.append({"round": number, "worker": "", "phase": "round", "reason": reason})
        self.log.save()


class RunManager:
    """Runs, one at a time, as asyncio tasks of this process; their records and events in the store."""

    def __init__(self, store: RunStore, parse: Callable[[list[str]], argparse.Namespace], launch: Launch,
                 server_argv: list[str], keep_round_models: int = 5, observers: list[RunObserver] = ()):
        self.store = store
        self.parse = parse
        self.launch = launch
        self.server_argv = server_argv  # the server's own flags every run gets (security, data)
        self.keep_round_models = keep_round_models
        self.observers = list(observers)
        self.active: ActiveRun | None = None
        add_sink(self._sink)

    def close(self) -> None:
        remove_sink(self._sink)

    def _sink(self, event: dict) -> None:
        run_id = event.pop("run", None)  # bound in the run's task: every event of the run carries it
        if run_id in self.store.logs:
            self.store.logs[run_id].add_event(event)

    # -- turning a spec into a `train` run ------------------------------------------------------------------

    def _argv(self, spec: cpb.RunSpec, directory: Path, resume: bool) -> list[str]:
        argv = ["train", *self.server_argv, "--output-dir", str(directory),
                "--keep-round-models", str(self.keep_round_models)]
        for flag, value in (("--task", spec.task), ("--model", spec.model), ("--dataset", spec.dataset),
                            ("--rounds", spec.rounds), ("--workers", ",".join(spec.workers)),
                            ("--workers-dns", spec.workers_dns), ("--expect-workers", spec.expect_workers)):
            if value:
                argv += [flag, str(value)]
        for key, value in sorted(spec.settings.items()):
            name = key.strip().lstrip("-")
            if name in SERVER_ONLY:
                raise ValueError(f"settings[{key!r}] cannot be set in a run: it is the server's own flag or a field of "
                                 f"RunSpec (security, where results go, and data come from `coordinator serve`)")
            if value.lower() == "true":
                argv.append(f"--{name}")
            elif value.lower() != "false":
                argv += [f"--{name}", value]
        return argv + (["--resume"] if resume else [])

    def _parsed(self, spec: cpb.RunSpec, directory: Path, resume: bool = False) -> argparse.Namespace:
        argv = self._argv(spec, directory, resume)
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors):
                args = self.parse(argv)
        except SystemExit:
            message = errors.getvalue().strip().splitlines()
            raise ValueError(message[-1] if message else f"invalid run settings: {argv}") from None
        if not args.workers and not args.workers_dns:
            raise ValueError("the run names no workers: set RunSpec.workers (NAME=HOST:PORT) or workers_dns")
        task_class(args.task)  # a task that cannot be found is refused here, not in a run that fails at once
        return args

    # -- operations -------------------------------------------------------------------------------------------

    def _refuse_if_busy(self) -> None:
        if self.active is not None:
            run = self.active.log.record
            raise Busy(f"run {run.run_id} is training (round {run.round} of {run.rounds}); one run trains at a time: "
                       f"StopRun it or wait until it ends")

    def start(self, spec: cpb.RunSpec) -> RunLog:
        self._refuse_if_busy()
        run_id = spec.run_id or self.store.new_id()
        probe = self.store.root / run_id
        args = self._parsed(spec, probe)  # refused before anything is created
        run_log = self.store.create(run_id, json_format.MessageToDict(spec, preserving_proto_field_name=True),
                                    args.rounds)
        self._launch(run_log, args)
        return run_log

    def resume(self, run_id: str) -> RunLog:
        run_log = self.store.get(run_id)
        if run_log.record.state not in RESUMABLE:
            raise NotNow(f"run {run_id} is {run_log.record.state}; only {', '.join(RESUMABLE)} runs resume")
        self._refuse_if_busy()
        spec = json_format.ParseDict(run_log.record.spec, cpb.RunSpec())
        args = self._parsed(spec, run_log.directory, resume=True)
        run_log.record.error, run_log.record.ended_at = "", 0.0
        self._launch(run_log, args)
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

    def _launch(self, run_log: RunLog, args: argparse.Namespace) -> None:
        run_log.record.state = "training"
        run_log.save()
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(self._execute(run_log, args, stop))
        self.active = ActiveRun(run_log, task, stop)

    async def _execute(self, run_log: RunLog, args: argparse.Namespace, stop: asyncio.Event) -> None:
        record = run_log.record
        structlog.contextvars.bind_contextvars(run=record.run_id)
        log.info("run_started", run_id=record.run_id, resume=args.resume)
        state, error = "finished", ""
        try:
            await self.launch(args, Observers([RunProgress(run_log), *self.observers]), stop)
        except RunStopped as exc:
            state, error = "stopped", str(exc)
        except asyncio.CancelledError:
            state = self.active.ending or "interrupted"
            error = ("stopped at once on request: the round in progress was abandoned; the last completed round is "
                     "checkpointed" if state == "stopped" else "the coordinator stopped while this run trained")
        except Exception as exc:  # every failure ends the run, with its reason; the server carries on
            state, error = "failed", str(exc) or type(exc).__name__
            if not isinstance(exc, (ValueError, OSError)):
                log.exception("run_crashed")
        finally:
            record.state, record.error, record.ended_at = state, error, time.time()
            run_log.save()
            log.info("run_ended", run_id=record.run_id, state=state, round=record.round, reason=error or None)
            self.active = None

    async def watch(self, run_id: str, from_start: bool) -> AsyncIterator[dict]:
        run_log = self.store.get(run_id)
        seen = 0 if from_start else len(run_log.events)
        while True:
            while seen < len(run_log.events):
                yield run_log.events[seen]
                seen += 1
            if run_log.ended:
                return
            await asyncio.sleep(0.2)

    def model(self, run_id: str, round: int) -> serde.WeightsPayload:
        """The run's global model: after `round`, or the latest (the final model of a finished run)."""
        run_log = self.store.get(run_id)
        directory, record = run_log.directory, run_log.record
        architecture = json.loads((directory / "config.json").read_text())["model"] \
            if (directory / "config.json").is_file() else ""
        if round == 0 and record.state == "finished" and (directory / "model.pt").is_file():
            return serde.WeightsPayload(torch.load(directory / "model.pt", weights_only=True), round=record.round,
                                        architecture=architecture)
        if round == 0 and (directory / "checkpoint.pt").is_file():
            ckpt = torch.load(directory / "checkpoint.pt", weights_only=True)
            return serde.WeightsPayload(ckpt["state_dict"], round=ckpt["round"], architecture=architecture)
        path = directory / ROUND_MODELS / f"round-{round}.pt"
        if round and path.is_file():
            return serde.WeightsPayload(torch.load(path, weights_only=True), round=round, architecture=architecture)
        kept = sorted(int(p.stem.split("-")[1]) for p in (directory / ROUND_MODELS).glob("round-*.pt"))
        raise UnknownRun(f"run {run_id} has no model for round {round or 'latest'}: "
                         + (f"rounds kept: {', '.join(map(str, kept))} (and 0 for the latest)" if kept
                            else "no round has completed yet"))


class CoordinatorServicer(cpb_grpc.CoordinatorServicer):
    def __init__(self, manager: RunManager):
        self.manager = manager

    async def _abort(self, context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
        code = {UnknownRun: grpc.StatusCode.NOT_FOUND, Busy: grpc.StatusCode.ABORTED,
                NotNow: grpc.StatusCode.FAILED_PRECONDITION, FileExistsError: grpc.StatusCode.ALREADY_EXISTS,
                ValueError: grpc.StatusCode.INVALID_ARGUMENT, TaskError: grpc.StatusCode.INVALID_ARGUMENT,
                }.get(type(exc))
        if code is None:
            code = grpc.StatusCode.INTERNAL
            log.exception("request_failed", method=method)
        log.warning("request_rejected", method=method, code=code.name, reason=str(exc), peer=context.peer())
        await context.abort(code, str(exc))

    async def StartRun(self, request, context):
        try:
            return self.manager.start(request).record.to_proto()
        except Exception as exc:
            await self._abort(context, exc, "StartRun")

    async def GetRun(self, request, context):
        try:
            return self.manager.store.get(request.run_id).record.to_proto()
        except Exception as exc:
            await self._abort(context, exc, "GetRun")

    async def ListRuns(self, request, context):
        return cpb.Runs(runs=[run_log.record.to_proto() for run_log in self.manager.store.newest_first()])

    async def WatchRun(self, request, context):
        try:
            async for event in self.manager.watch(request.run_id, request.from_start):
                yield cpb.RunEvent(run_id=request.run_id, sequence=event["sequence"], event=str(event.get("event")),
                                   json=json.dumps(event, default=str))
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
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"chunk_size must be between 1024 and {serde.DEFAULT_MAX_CHUNK_BYTES} bytes")
        for chunk in payload.chunks(chunk_size, pb.CHUNK_ENCODING_RAW):
            yield chunk


async def serve(manager: RunManager, address: str, security: ServerSecurity, grace: float = 30.0) -> None:
    server = grpc.aio.server(interceptors=[AuthInterceptor(security)])
    cpb_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(manager), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_secure_port(address, security.credentials()) if security.tls else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    interrupted = [r.run_id for r in (l.record for l in manager.store.logs.values()) if r.state == "interrupted"]
    log.info("coordinator_serving", address=address, port=port, state_dir=str(manager.store.root.parent),
             runs=len(manager.store.logs), interrupted=interrupted, tls=security.tls,
             mutual_tls=security.client_ca_file is not None, token=security.token is not None)
    if security.token is None and security.client_ca_file is None:
        log.warning("coordinator_unauthenticated", hint="anyone who reaches this port can start and stop runs; see "
                                                        "--api-token-file and --api-client-ca")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("coordinator_stopping")
        await health_servicer.enter_graceful_shutdown()
        await manager.interrupt()
        await server.stop(grace)
        manager.close()
