"""One worker as the coordinator sees it: a channel, deadlines on every call, streaming, and gRPC errors translated
into a small hierarchy the round loop can reason about."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import structlog
import torch

from fedpi.net.protocol import (
    AUTH_METADATA_KEY,
    MIN_TRANSFER_BYTES_PER_SECOND,
    PROTOCOL_VERSION,
    SERVICE_NAME,
    VERSION_METADATA_KEY,
    ProtocolMismatch,
    check_compatible,
    check_minimum,
)
from fedpi.task import Task, fingerprint
from fedpi.weights import serde, wire
from generated.fedpi.v1 import worker_pb2 as pb
from generated.fedpi.v1 import worker_pb2_grpc as pb_grpc

log = structlog.get_logger()

# Transient UNAVAILABLE (a worker restarting, Wi-Fi hiccup) is retried by gRPC itself, with backoff, for the calls
# that are safe to repeat. Never Train: a repeated Train would train twice, and a lost one is the round's business.
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": SERVICE_NAME, "method": m} for m in ("GetInfo", "SetWeights", "GetWeights")],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.5s",
                    "maxBackoff": "5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)
# Workers must echo round ids and mark heartbeats (protocol 1.1) for their updates to be trusted.
MINIMUM_WORKER_PROTOCOL = "1.1"


def channel_options(keepalive_seconds: float = 30.0, retry: bool = True) -> list[tuple[str, object]]:
    """Keepalive pings keep a quiet connection (a 10-minute Train on a slow Pi) open through NATs and idle timeouts,
    and find a dead peer within keepalive + 10 s. Workers accept pings this often (worker_service.server). Without
    `retry` (a person asking, `fedpi status`) a refused connection is an answer at once."""
    options: list[tuple[str, object]] = [
        ("grpc.keepalive_time_ms", int(keepalive_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    return options + (
        [("grpc.enable_retries", 1), ("grpc.service_config", _SERVICE_CONFIG)]
        if retry
        else [("grpc.enable_retries", 0)]
    )


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


@dataclass(frozen=True)
class ClientSecurity:
    """How the coordinator proves itself to workers and checks them: a bearer token, TLS, or mutual TLS."""

    token: str | None = field(default=None, repr=False)
    ca_file: Path | None = None  # verify workers' certificates against this CA (turns TLS on)
    cert_file: Path | None = None  # with key_file: our client certificate (mutual TLS)
    key_file: Path | None = None
    server_name: str | None = None  # the name worker certificates carry when they are dialled by IP address
    # With TLS: each worker's certificate must name the worker id it reports in GetInfo, so that one worker's
    # certificate cannot stand in for another's.
    verify_worker_id: bool = True

    @property
    def tls(self) -> bool:
        return self.ca_file is not None

    def for_name(self, name: str) -> ClientSecurity:
        """The same settings, expecting `name` on the worker's certificate."""
        return replace(self, server_name=name)

    def channel(self, address: str, options: list) -> grpc.aio.Channel:
        if self.ca_file is None:
            return grpc.aio.insecure_channel(address, options=options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes(),
            private_key=self.key_file.read_bytes() if self.key_file else None,
            certificate_chain=self.cert_file.read_bytes() if self.cert_file else None,
        )
        if self.server_name:
            options = [*options, ("grpc.ssl_target_name_override", self.server_name)]
        return grpc.aio.secure_channel(address, credentials, options=options)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        version = ((VERSION_METADATA_KEY, PROTOCOL_VERSION),)
        return version + ((AUTH_METADATA_KEY, f"Bearer {self.token}"),) if self.token else version


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


def parse_workers(spec: str) -> list[tuple[str, str]]:
    """'alice=10.0.0.2:50051,bob=…' -> [(name, address)]; a bare address is named after itself."""
    workers = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, address = item.partition("=")
        if not sep:
            name, address = item, item
        if ":" not in address:
            raise ValueError(f"worker {name!r}: address {address!r} needs a port, e.g. {address}:50051")
        workers.append((name, address))
    names = [n for n, _ in workers]
    if len(set(names)) != len(names):
        raise ValueError(f"worker names must be unique: {names}")
    if not workers:
        raise ValueError("no workers given; use --workers alice=HOST:PORT,bob=HOST:PORT")
    return workers


class DiscoveryFailed(Exception):
    """Fewer workers than expected showed up in DNS in time."""


def _join(host: str, port: str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split_target(target: str) -> tuple[str, str]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(
            f"--workers-dns needs HOST:PORT, e.g. fedpi-worker.fedpi.svc.cluster.local:50051; got {target!r}"
        )
    return host, port


async def resolve(target: str) -> list[tuple[str, str]]:
    """HOST:PORT -> [(address, address)] for every address HOST resolves to now (none if it does not resolve)."""
    host, port = _split_target(target)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    return [(_join(a, port), _join(a, port)) for a in sorted({str(info[4][0]) for info in infos})]


async def discover(target: str, expect: int, timeout: float, interval: float = 2.0) -> list[tuple[str, str]]:
    """Resolve HOST:PORT (a Kubernetes headless Service) until it yields `expect` addresses.

    Workers found this way are named by address until their handshake reports their worker id.
    """
    host, _ = _split_target(target)
    deadline = time.monotonic() + timeout
    while True:
        found = await resolve(target)
        if len(found) >= expect:
            return found
        if time.monotonic() > deadline:
            raise DiscoveryFailed(
                f"{host} resolves to {len(found)} worker(s) after {timeout:.0f} s, expected "
                f"{expect}: are the worker pods Ready (kubectl get pods)?"
            )
        log.info("workers_waiting", dns=host, found=len(found), expected=expect)
        await asyncio.sleep(interval)


def elapsed(start: float) -> float:
    return time.perf_counter() - start
