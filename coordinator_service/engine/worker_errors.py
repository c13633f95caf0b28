"""Why a call to a worker failed, as a small hierarchy the round loop can reason about, translated from gRPC
status codes in one place."""

from __future__ import annotations

import grpc
import structlog

from fedpi.net.protocol import (
    PROTOCOL_VERSION,
    SERVICE_NAME,
)

log = structlog.get_logger()


class WorkerError(Exception):
    """A call to a worker failed. `worker` names it; the message says what happened and what to do."""

    def __init__(self, worker: str, message: str):
        super().__init__(f"{worker}: {message}")
        self.worker = worker


class WorkerUnavailable(WorkerError):
    """The worker cannot be reached (down, restarting, network gone)."""


class WorkerTimeout(WorkerError):
    """The worker did not answer, or stopped reporting progress, in time."""


class WorkerIncompatible(WorkerError):
    """The worker runs another protocol version or model architecture."""


class WorkerBusy(WorkerError):
    """The worker is serving another call (another coordinator?)."""


class WorkerRefusedUs(WorkerError):
    """The worker does not accept this coordinator's credentials."""


class WorkerRejected(WorkerError):
    """The worker refused the request or sent something invalid."""


def translate(worker: str, method: str, exc: grpc.aio.AioRpcError) -> WorkerError:
    code, details = exc.code(), exc.details() or ""
    message = f"{method} failed with {code.name}: {details}"
    if code == grpc.StatusCode.UNAVAILABLE:
        return WorkerUnavailable(worker, message)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return WorkerTimeout(worker, message)
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return WorkerIncompatible(
            worker,
            f"{method} is not served: the worker does not speak {SERVICE_NAME}. "
            f"Upgrade it to a fedpi release that speaks protocol {PROTOCOL_VERSION}",
        )
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return WorkerIncompatible(worker, message)
    if code == grpc.StatusCode.ABORTED:
        return WorkerBusy(worker, message)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return WorkerRefusedUs(worker, message + " (check --token-file and the TLS certificates)")
    return WorkerRejected(worker, message)
