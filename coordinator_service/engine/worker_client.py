"""One worker as the coordinator sees it: a channel, deadlines on every call, streaming, and gRPC errors translated
into a small hierarchy the round loop can reason about."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import structlog
import torch

from coordinator_service.engine.worker_errors import (
    WorkerIncompatible,
    WorkerRefusedUs,
    WorkerRejected,
    WorkerTimeout,
    translate,
)
from fedpi.net.client import ClientSecurity, channel_options
from fedpi.net.protocol import (
    MIN_TRANSFER_BYTES_PER_SECOND,
    PROTOCOL_VERSION,
    SERVICE_NAME,
    ProtocolMismatch,
    check_compatible,
    check_minimum,
)
from fedpi.task import Task, fingerprint
from fedpi.weights import serde, wire
from generated.fedpi.v1 import worker_pb2 as pb
from generated.fedpi.v1 import worker_pb2_grpc as pb_grpc

log = structlog.get_logger()

# Workers must echo round ids and mark heartbeats (protocol 1.1) for their updates to be trusted.
MINIMUM_WORKER_PROTOCOL = "1.1"


@dataclass(frozen=True)
class Expected:
    """What a worker must run to take part: the coordinator's task and its model."""

    architecture: str  # carried in weight headers; all a worker before protocol 1.4 reports
    task: str = "mnist"
    task_version: str = ""
    fingerprint: str = ""  # fedpi.task.fingerprint of the model's manifest
    dataset: str | None = None  # what the coordinator evaluates on; a worker reporting another is warned about

    @classmethod
    def of(cls, task: Task, model: torch.nn.Module) -> Expected:
        return cls(
            task.architecture,
            task.name,
            task.version,
            fingerprint(serde.manifest_of(model.state_dict())),
            task.data_name,
        )

    def describe(self) -> str:
        return f"task {self.task} {self.task_version} (model {self.architecture}, manifest {self.fingerprint})"

    def check(self, info: pb.WorkerInfo) -> str | None:
        """Why `info`'s worker cannot train with us, or None."""
        if not info.task:  # before protocol 1.4: the built-in task, known by its model alone
            if self.task != "mnist":
                return (
                    f"worker speaks fedpi protocol {info.protocol_version}, which has no tasks; coordinator "
                    f"trains {self.describe()}: upgrade the worker to a fedpi release that speaks "
                    f"protocol {PROTOCOL_VERSION}"
                )
            if info.model_architecture != self.architecture:
                return (
                    f"worker runs model {info.model_architecture!r}, coordinator trains {self.architecture!r}; "
                    f"restart one of them with the same --model"
                )
            return None
        theirs = (
            f"task {info.task} {info.task_version} (model {info.model_architecture}, "
            f"manifest {info.manifest_fingerprint})"
        )
        if info.task != self.task:
            return (
                f"worker runs {theirs}, coordinator trains {self.describe()}; start both with the same --task "
                f"(FEDPI_TASK)"
            )
        if info.model_architecture != self.architecture:  # the built-in task's --model
            return (
                f"worker runs model {info.model_architecture!r}, coordinator trains {self.architecture!r} (task "
                f"{self.task}); restart one of them with the same --model"
            )
        if info.manifest_fingerprint != self.fingerprint:
            return (
                f"worker runs {theirs}, coordinator trains {self.describe()}: their models differ (tensor names, "
                f"dtypes or shapes); install the same version of the task on both"
            )
        return None


class WorkerClient:
    def __init__(
        self,
        name: str,
        address: str,
        *,
        rpc_timeout: float = 30.0,
        idle_timeout: float = 120.0,
        keepalive_seconds: float = 30.0,
        security: ClientSecurity = ClientSecurity(),
        retry: bool = True,
    ):
        self.name = name
        self.address = address
        self.rpc_timeout = rpc_timeout
        self.idle_timeout = idle_timeout
        self._metadata = security.metadata
        self._security = security
        self._keepalive_seconds = keepalive_seconds
        self._use(security.channel(address, channel_options(keepalive_seconds, retry)))
        self._verified_id: str | None = None  # the worker id this channel's certificate check is bound to
        self.info: pb.WorkerInfo | None = None  # from the last handshake

    def _use(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel
        self._stub = pb_grpc.WorkerStub(channel)
        # SetWeights takes messages serialised already: a Broadcast serialises the global model once for all workers.
        self._set_weights = channel.stream_unary(
            f"/{SERVICE_NAME}/SetWeights",
            request_serializer=None,
            response_deserializer=pb.SetWeightsResponse.FromString,
        )
        # An update's data chunks arrive as views of what gRPC received, not copied out of a parsed message.
        self._get_weights = channel.unary_stream(
            f"/{SERVICE_NAME}/GetWeights",
            request_serializer=pb.GetWeightsRequest.SerializeToString,
            response_deserializer=wire.from_wire,
        )

    async def close(self) -> None:
        await self._channel.close()

    def _transfer_timeout(self, nbytes: int) -> float:
        return self.rpc_timeout + nbytes / MIN_TRANSFER_BYTES_PER_SECOND

    async def get_info(self) -> pb.WorkerInfo:
        try:
            return await self._stub.GetInfo(pb.GetInfoRequest(), timeout=self.rpc_timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise translate(self.name, "GetInfo", exc) from None

    async def handshake(self, expected: Expected) -> pb.WorkerInfo:
        """GetInfo plus the checks that must pass before any weights move."""
        info = await self.get_info()
        try:
            check_compatible(coordinator=PROTOCOL_VERSION, worker=info.protocol_version)
            check_minimum(info.protocol_version, MINIMUM_WORKER_PROTOCOL, "round ids and training progress")
        except ProtocolMismatch as exc:
            raise WorkerIncompatible(self.name, str(exc)) from None
        if (reason := expected.check(info)) is not None:
            raise WorkerIncompatible(self.name, reason)
        if info.train_samples == 0:
            raise WorkerIncompatible(self.name, "worker has no training samples in its shard")
        if self._security.tls and self._security.verify_worker_id and self._verified_id != info.worker_id:
            await self._bind_identity(info.worker_id)
        self.info = info
        return info

    async def _bind_identity(self, worker_id: str) -> None:
        """Reconnect expecting `worker_id` on the certificate; every later call goes over that channel."""
        channel = self._security.for_name(worker_id).channel(self.address, channel_options(self._keepalive_seconds))
        stub = pb_grpc.WorkerStub(channel)
        try:
            await stub.GetInfo(
                pb.GetInfoRequest(), timeout=self.rpc_timeout, metadata=self._metadata, wait_for_ready=False
            )
        except grpc.aio.AioRpcError as exc:
            await channel.close()
            raise WorkerRefusedUs(
                self.name,
                f"worker says it is {worker_id!r}, but its TLS certificate does not name "
                f"{worker_id!r} ({exc.details()}); issue it a certificate of its own "
                f"(make certs)",
            ) from None
        await self._channel.close()
        self._use(channel)
        self._verified_id = worker_id

    async def set_weights(self, stream: serde.Broadcast, total_bytes: int) -> int:
        """Install a payload of `total_bytes` on the worker, sent as `stream`; returns the bytes of chunk data sent."""
        try:
            await self._set_weights(
                stream.receiver(), timeout=self._transfer_timeout(total_bytes), metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise translate(self.name, "SetWeights", exc) from None
        return stream.wire_bytes

    async def train(
        self, request: pb.TrainRequest, on_progress: Callable[[pb.TrainProgress], None] | None = None
    ) -> pb.TrainResult:
        """Train one round. There is no overall deadline (a slow Pi is not a dead one): a batch must finish at least
        every `idle_timeout` seconds instead. Heartbeats show the worker is alive but do not count as progress, so a
        training thread that hangs is caught here, not by the round timeout."""
        call = self._stub.Train(request, metadata=self._metadata)
        loop = asyncio.get_running_loop()
        batches_done, last_advance = -1, loop.time()
        try:
            while True:
                left = last_advance + self.idle_timeout - loop.time()
                try:
                    update = await asyncio.wait_for(call.read(), max(left, 0.0))
                except TimeoutError:
                    call.cancel()
                    what = "no batch finished" if batches_done >= 0 else "no progress arrived"
                    raise WorkerTimeout(
                        self.name, f"Train: {what} for {self.idle_timeout:.0f} s (--idle-timeout)"
                    ) from None
                if update is grpc.aio.EOF:
                    raise WorkerRejected(self.name, "Train ended without a result")
                if update.HasField("result"):
                    await self._end_of(call)
                    return update.result
                if update.progress.batches_done > batches_done:
                    batches_done, last_advance = update.progress.batches_done, loop.time()
                if on_progress is not None:
                    on_progress(update.progress)
        except grpc.aio.AioRpcError as exc:
            raise translate(self.name, "Train", exc) from None
        finally:
            call.cancel()  # no-op once finished; stops the worker's training if we leave early

    async def evaluate(self, round_id: str) -> pb.EvaluateResult:
        """Evaluate the installed weights (of `round_id`) on the worker's local test split. Evaluation makes no
        progress reports, so it gets the idle timeout as its deadline on top of the usual one."""
        try:
            return await self._stub.Evaluate(
                pb.EvaluateRequest(round_id=round_id),
                metadata=self._metadata,
                timeout=self.rpc_timeout + self.idle_timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise translate(self.name, "Evaluate", exc) from None

    async def _end_of(self, call) -> None:
        """Wait for a call that has said everything to end by itself, rather than cancel it: the worker then
        records it as OK, not CANCELLED. A worker that does not end it in time is cancelled after all."""
        try:
            await asyncio.wait_for(call.code(), self.rpc_timeout)
        except TimeoutError:
            pass

    async def get_weights(
        self, chunk_size: int, encoding: int, expected_bytes: int, digest_in_trailer: bool = False
    ) -> AsyncIterator[pb.WeightsChunk | wire.Data]:
        call = self._get_weights(
            pb.GetWeightsRequest(
                chunk_size=chunk_size,
                encoding=encoding,  # type: ignore[arg-type]  # an enum's number, as protobuf takes it
                digest_in_trailer=digest_in_trailer,
                digests=list(serde.DIGESTS),
            ),
            timeout=self._transfer_timeout(expected_bytes),
            metadata=self._metadata,
        )
        try:
            async for chunk in call:
                yield chunk
        except grpc.aio.AioRpcError as exc:
            raise translate(self.name, "GetWeights", exc) from None
        finally:
            call.cancel()

    # -- secure aggregation (engine.secure) --------------------------------------------------------------------

    async def _short(self, method: str, request):
        """A short unary call of secure aggregation, its errors translated."""
        try:
            return await getattr(self._stub, method)(request, timeout=self.rpc_timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise translate(self.name, method, exc) from None

    async def secagg_keys(self, config: pb.SecAggConfig) -> pb.SecAggKeysResponse:
        return await self._short("SecAggKeys", pb.SecAggKeysRequest(config=config))

    async def secagg_shares(self, request: pb.SecAggSharesRequest) -> pb.SecAggSharesResponse:
        return await self._short("SecAggShares", request)

    async def get_masked_update(self, request: pb.GetMaskedUpdateRequest, expected_bytes: int) -> AsyncIterator:
        call = self._stub.GetMaskedUpdate(
            request, timeout=self._transfer_timeout(expected_bytes), metadata=self._metadata
        )
        try:
            async for chunk in call:
                yield chunk
        except grpc.aio.AioRpcError as exc:
            raise translate(self.name, "GetMaskedUpdate", exc) from None
        finally:
            call.cancel()

    async def secagg_unmask(self, request: pb.SecAggUnmaskRequest) -> pb.SecAggUnmaskResponse:
        return await self._short("SecAggUnmask", request)


def speaks(client: WorkerClient, version: str) -> bool:
    """Whether the worker (as of its last handshake) speaks protocol `version` or later."""
    if client.info is None:
        return False
    try:
        check_minimum(client.info.protocol_version, version, "")
    except ProtocolMismatch:
        return False
    return True


def offered(client: WorkerClient, encoding: int) -> int:
    """`encoding` if the worker offers it in GetInfo's chunk encodings (any, if it was never asked), otherwise raw."""
    if client.info is None or encoding in client.info.chunk_encodings:
        return encoding
    return pb.CHUNK_ENCODING_RAW


def upload_digest(client: WorkerClient) -> str | None:
    """The digest to send the global model to this worker with, in a trailer: the first of those it lists (fastest
    first on its CPU) that we compute too. None for a worker before protocol 1.6: the sha256 digest in the header."""
    if client.info is None:
        return None
    return next((name for name in client.info.digests if name in serde.DIGESTS), None)
