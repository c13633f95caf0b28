"""`coordinator serve`: the coordinator as a long-running gRPC service (fedpi.v1.Coordinator). Operators start,
watch, stop and resume training runs and fetch their models; each run is a `train` run, with the same flags and
the same code, in its own directory under --state-dir (see coordinator_service.control.runs).

One run trains at a time: the workers hold one model each. A StartRun while a run trains is refused with ABORTED,
naming that run, rather than queued: the operator decides whether to stop it or wait.
"""

from __future__ import annotations

import asyncio
import json

import grpc
import structlog

from coordinator_service.control.manager import (
    Busy,
    NotNow,
    RunManager,
    TooMany,
)
from coordinator_service.control.runs import UnknownRun
from coordinator_service.control.runspec import InvalidSpec, NotAllowed
from fedpi.net import server as grpc_server
from fedpi.net.auth import AuthInterceptor, ServerSecurity
from fedpi.net.ports import listen
from fedpi.task import TaskError
from fedpi.weights import serde
from generated.fedpi.v1 import coordinator_pb2 as cpb
from generated.fedpi.v1 import coordinator_pb2_grpc as cpb_grpc
from generated.fedpi.v1 import worker_pb2 as pb

log = structlog.get_logger()

SERVICE = cpb.DESCRIPTOR.services_by_name["Coordinator"].full_name
MAX_REQUEST_BYTES = 1 << 20  # a RunSpec is a few hundred bytes; nothing the API takes needs more
DEFAULT_PAGE, MAX_PAGE = 50, 500


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
