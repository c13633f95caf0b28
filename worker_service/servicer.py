"""The fedpi.v1.Worker gRPC servicer: decode, call the plain classes, encode; domain errors become status codes here."""

from __future__ import annotations

import asyncio
import itertools
import platform
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc
import structlog
import torch

import fedpi
from fedpi.data import Dataset
from fedpi.models import parameter_count
from fedpi.net.protocol import (
    MIN_TRANSFER_BYTES_PER_SECOND,
    PROTOCOL_VERSION,
    VERSION_METADATA_KEY,
    ProtocolMismatch,
    check_compatible,
)
from fedpi.task import Task, fingerprint
from fedpi.weights import compression, serde
from generated.fedpi.v1 import worker_pb2 as pb
from generated.fedpi.v1 import worker_pb2_grpc as pb_grpc
from worker_service.metrics import WorkerMetrics
from worker_service.trainer import DEFAULT_MAX_LOCAL_BATCHES, TrainConfig, Trainer, TrainOutcome
from worker_service.training_job import TrainingJob

log = structlog.get_logger()

NOT_TRAINABLE = -1  # weights_round after an interrupted Train: the next SetWeights makes the model whole again


# How a refused weight stream is answered; any other WeightsError is INVALID_ARGUMENT.
WEIGHTS_STATUS = (
    (serde.ArchitectureMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (serde.DigestMismatch, grpc.StatusCode.DATA_LOSS),
    (serde.PayloadTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (serde.UploadTimedOut, grpc.StatusCode.DEADLINE_EXCEEDED),
)


def weights_status(exc: serde.WeightsError) -> grpc.StatusCode:
    return next((code for kind, code in WEIGHTS_STATUS if isinstance(exc, kind)), grpc.StatusCode.INVALID_ARGUMENT)


@dataclass(frozen=True)
class Limits:
    max_chunk_bytes: int = serde.DEFAULT_MAX_CHUNK_BYTES
    max_payload_bytes: int = serde.DEFAULT_MAX_PAYLOAD_BYTES
    default_chunk_bytes: int = serde.DEFAULT_CHUNK_BYTES
    max_local_batches: int = DEFAULT_MAX_LOCAL_BATCHES
    # An upload must show its header within upload_grace seconds and then arrive at upload_bytes_per_second or
    # faster (the coordinator's own transfer deadline uses the same rate), so an idle client cannot hold the one
    # upload slot for ever.
    upload_grace: float = 30.0
    upload_bytes_per_second: int = MIN_TRANSFER_BYTES_PER_SECOND
    # Concurrent GetWeights streams share one snapshot of the weights; more than this are refused.
    max_concurrent_downloads: int = 4


class Replay:
    """The items of an iterator, made once, on a thread, as the first reader needs them; every reader gets them all."""

    def __init__(self, source: Iterator):
        self._source = source
        self._items: list = []
        self._done = False
        self._lock = asyncio.Lock()  # one thread advances the source at a time

    async def replay(self) -> AsyncIterator:
        i = 0
        while True:
            if i == len(self._items):
                async with self._lock:
                    if i == len(self._items) and not self._done:
                        item = await asyncio.to_thread(next, self._source, _END)
                        if item is _END:
                            self._done = True
                        else:
                            self._items.append(item)
            if i == len(self._items):
                return
            yield self._items[i]
            i += 1


_END = object()


class Busy(Exception):
    """Another call holds the model (training, or another upload): the caller should retry later."""


class TooManyDownloads(Exception):
    """More GetWeights streams at once than the worker serves."""


class WorkerServicer(pb_grpc.WorkerServicer):
    def __init__(
        self,
        *,
        worker_id: str,
        model_name: str,
        model: torch.nn.Module,
        data: Dataset,
        partition: str,
        limits: Limits = Limits(),
        progress_every: float = 2.0,
        train_delay: float = 0.0,
        metrics: WorkerMetrics | None = None,
        task: Task | None = None,
    ):
        self.worker_id = worker_id
        self.warning = ""  # what is unsafe about how this worker serves (--insecure), for GetInfo
        self.model_name = model_name
        self.model = model
        self.data = data
        self.partition = partition
        self.metrics = metrics or WorkerMetrics(worker_id)
        self.limits = limits
        self.progress_every = progress_every
        self.trainer = Trainer(model, data, batch_delay=train_delay, max_batches=limits.max_local_batches, task=task)
        self.task = self.trainer.task
        self.manifest = serde.manifest_of(model.state_dict())
        self.fingerprint = fingerprint(self.manifest)
        # Measured now, not by the first GetWeights: on a Pi's CPU share it takes a noticeable part of a second.
        self.digests = serde.digests_by_speed()
        self.weights_round = 0  # the deterministic initial weights
        self.weights_round_id = ""  # the coordinator's id of the round whose weights are installed
        self.weights_trained = False  # Train has changed the installed weights since SetWeights
        self.training_round: int | None = None
        self.evaluating = False
        self._model_lock = asyncio.Lock()  # held while training or installing: the model is never seen half-done
        self._upload_active = False  # one upload at a time bounds the memory held by partial uploads
        # Uploads take turns between two buffers: the model lives in one (_install), the next upload fills the other.
        self._upload_buffer: bytearray | None = None
        self._model_buffer: bytearray | None = None
        # Shared by GetWeights streams until the weights change; it reads the model's own tensors (_leave_snapshot).
        self._snapshot: serde.WeightsPayload | None = None
        # int8 deltas (TrainRequest.update_encoding): the weights Train started from, the quantisation error fed back
        # into the next update, and this update's chunks, quantised once however often they are fetched.
        self._base: list[torch.Tensor | None] | None = None
        self._residual: list[torch.Tensor | None] | None = None
        self._int8: tuple[int, Replay] | None = None  # (chunk size, its chunks)
        self._downloads = 0

    # -- helpers ---------------------------------------------------------------------------------------------

    def _check_protocol(self, context: grpc.aio.ServicerContext) -> None:
        for key, value in context.invocation_metadata() or ():
            if key == VERSION_METADATA_KEY:
                check_compatible(coordinator=value, worker=PROTOCOL_VERSION)

    def _busy_reason(self) -> str:
        if self.training_round is not None:
            return f"worker {self.worker_id} is training round {self.training_round}"
        if self.evaluating:
            return f"worker {self.worker_id} is evaluating its weights"
        return f"worker {self.worker_id} is installing weights"

    async def _abort(self, context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
        """The one place where domain errors become gRPC status codes."""
        if isinstance(exc, serde.WeightsError):
            code = weights_status(exc)
        elif isinstance(exc, ProtocolMismatch):
            code = grpc.StatusCode.FAILED_PRECONDITION
        elif isinstance(exc, Busy):
            code = grpc.StatusCode.ABORTED
        elif isinstance(exc, TooManyDownloads):
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
        elif isinstance(exc, ValueError):
            code = grpc.StatusCode.INVALID_ARGUMENT
        else:
            code = grpc.StatusCode.INTERNAL
            log.exception("request_failed", method=method)
        log.warning("request_rejected", method=method, code=code.name, reason=str(exc), peer=context.peer())
        await context.abort(code, str(exc))

    # -- RPCs ------------------------------------------------------------------------------------------------

    async def GetInfo(self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext) -> pb.WorkerInfo:
        try:
            self._check_protocol(context)
        except ProtocolMismatch as exc:
            await self._abort(context, exc, "GetInfo")
        return pb.WorkerInfo(
            worker_id=self.worker_id,
            protocol_version=PROTOCOL_VERSION,
            software_version=fedpi.__version__,
            model_architecture=self.model_name,
            parameter_count=parameter_count(self.model),
            train_samples=len(self.data.train),
            test_samples=len(self.data.test),
            dataset=self.data.name,
            partition=self.partition,
            chunk_encodings=list(serde.SUPPORTED_ENCODINGS),
            state=pb.WORKER_STATE_TRAINING if self.training_round is not None else pb.WORKER_STATE_IDLE,
            torch_version=torch.__version__,
            cpu_architecture=platform.machine(),
            weights_round=self.weights_round,
            max_payload_bytes=self.limits.max_payload_bytes,
            max_chunk_bytes=self.limits.max_chunk_bytes,
            weights_round_id=self.weights_round_id,
            weights_trained=self.weights_trained,
            max_local_batches=self.limits.max_local_batches,
            task=self.task.name,
            task_version=self.task.version,
            manifest_fingerprint=self.fingerprint,
            digests=self.digests,
            warning=self.warning,
        )

    async def SetWeights(
        self, request_iterator: AsyncIterator[pb.WeightsChunk], context: grpc.aio.ServicerContext
    ) -> pb.SetWeightsResponse:
        start = time.perf_counter()
        try:
            self._check_protocol(context)
            # Refused before a byte is read: nothing can be installed while the model is in use.
            if self._model_lock.locked():
                raise Busy(self._busy_reason() + "; weights were not installed, retry after it finishes")
            if self._upload_active:
                raise Busy(f"worker {self.worker_id} is receiving another SetWeights stream; retry when it is done")
            self._upload_active = True
            try:  # until the upload is installed or dropped: the next one reuses its buffer
                reader, state, buffer = await self._receive(request_iterator)
                if self._model_lock.locked():
                    raise Busy(self._busy_reason() + "; weights were not installed, retry after it finishes")
                async with self._model_lock:
                    self._install(state, buffer)
                    self._set_weights_identity(reader.header.round, reader.header.round_id)
            finally:
                self._upload_active = False
        except (serde.WeightsError, ProtocolMismatch, Busy) as exc:
            await self._abort(context, exc, "SetWeights")
        seconds = time.perf_counter() - start
        log.info(
            "weights_installed",
            round=self.weights_round,
            round_id=self.weights_round_id,
            bytes=reader.received,
            seconds=round(seconds, 3),
        )
        return pb.SetWeightsResponse(round=self.weights_round, bytes_received=reader.received, seconds=seconds)

    async def _receive(
        self, request_iterator: AsyncIterator[pb.WeightsChunk]
    ) -> tuple[serde.StreamReader, dict[str, torch.Tensor], bytearray]:
        """Read and check a whole upload within its deadline: upload_grace for the header, then time for its size."""
        limits = self.limits
        reader = serde.StreamReader(
            architecture=self.model_name,
            expected=self.manifest,
            max_chunk_bytes=limits.max_chunk_bytes,
            max_payload_bytes=limits.max_payload_bytes,
        )
        assembler = serde.Assembler(reader, self._upload_buffer)
        loop = asyncio.get_running_loop()
        allowed = limits.upload_grace
        try:
            async with asyncio.timeout(allowed) as deadline:
                async for chunk in request_iterator:
                    if reader.hashes_fast:
                        assembler.add(chunk)  # a copy and a checksum: less work than a hop to a thread
                    else:  # sha256 or blake2b, off the event loop: gRPC reads the next chunk meanwhile
                        await asyncio.to_thread(assembler.add, chunk)
                    if serde.is_header(chunk):
                        allowed = limits.upload_grace + reader.header.total_bytes / limits.upload_bytes_per_second
                        deadline.reschedule(loop.time() + allowed)
        except TimeoutError:
            raise serde.UploadTimedOut(
                f"SetWeights stream took longer than the {allowed:.0f} s its size allows "
                f"({reader.received} of {reader.header.total_bytes if reader.header else '?'} bytes arrived); "
                f"nothing was installed"
            ) from None
        return reader, assembler.finish(), assembler.buffer

    def _install(self, state: dict[str, torch.Tensor], buffer: bytearray) -> None:
        """Under the model lock. The upload's buffer becomes the model's storage, no copy, and the storage it replaces
        takes the next upload, unless a GetWeights stream still reads it. A model that cannot take the buffer as it
        is (a state_dict entry that is not one of its parameters or buffers, or a tensor off its natural alignment)
        is copied into instead."""
        live = self.model.state_dict(keep_vars=True)
        own = {id(t) for t in itertools.chain(self.model.parameters(), self.model.buffers())}
        if not all(
            id(t) in own and state[name].data_ptr() % state[name].element_size() == 0 for name, t in live.items()
        ):
            self._leave_snapshot()
            self.model.load_state_dict(state)
            self._upload_buffer = buffer
            return
        with torch.no_grad():
            for name, t in live.items():
                t.data = state[name]
        self._upload_buffer = None if self._downloads else self._model_buffer
        self._model_buffer = buffer

    def _set_weights_identity(self, round_: int, round_id: str, trained: bool = False) -> None:
        self.weights_round, self.weights_round_id, self.weights_trained = round_, round_id, trained
        self._snapshot = None
        self._base = self._int8 = None
        self.metrics.weights_round.set(round_)

    def _check_trainable(self, request: pb.TrainRequest) -> None:
        if request.round != self.weights_round:
            raise ProtocolMismatch(
                f"worker {self.worker_id} holds the weights of round {self.weights_round}, asked to train "
                f"round {request.round}: call SetWeights for round {request.round} first"
            )
        if request.round_id and request.round_id != self.weights_round_id:
            raise ProtocolMismatch(
                f"worker {self.worker_id} holds the weights of round id {self.weights_round_id!r}, asked to train "
                f"round id {request.round_id!r}: call SetWeights for that round first"
            )
        if request.round_id and self.weights_trained:
            raise ProtocolMismatch(
                f"worker {self.worker_id} already trained the weights of round id {request.round_id!r}; an update "
                f"is one Train on freshly set weights: call SetWeights again"
            )

    async def Train(self, request: pb.TrainRequest, context: grpc.aio.ServicerContext) -> None:
        # Written with context.write rather than as a generator: a cancelled call then raises inside this coroutine,
        # and the `finally` below stops the training thread before the model lock is given up.
        cfg = TrainConfig(
            local_batches=request.local_batches,
            local_epochs=request.local_epochs,
            batch_size=request.batch_size,
            learning_rate=request.learning_rate,
            momentum=request.momentum,
            seed=request.seed,
            evaluate=request.evaluate,
            proximal_mu=request.proximal_mu,
            local_seconds=request.local_seconds,
        )
        try:
            self._check_protocol(context)
            cfg.validate(len(self.data.train), self.limits.max_local_batches)
            if self._model_lock.locked():
                raise Busy(self._busy_reason() + "; one Train at a time")
            self._check_trainable(request)
        except (ValueError, ProtocolMismatch, Busy) as exc:
            await self._abort(context, exc, "Train")
        outcome: TrainOutcome | None = None
        failure: Exception | None = None
        async with self._model_lock:
            self.training_round = request.round
            self.metrics.training.set(1)
            self._leave_snapshot()
            self._snapshot = self._int8 = None
            self._keep_base(request.update_encoding == pb.CHUNK_ENCODING_INT8_DELTA)
            structlog.contextvars.bind_contextvars(round=request.round)
            job = TrainingJob(self.trainer, cfg, self.progress_every)
            try:
                while (progress := await job.next_progress(self.progress_every)) is not None:
                    await context.write(pb.TrainUpdate(progress=progress))
                try:
                    outcome = job.future.result()
                except Exception as exc:  # a bug or a broken model: report it, keep serving
                    failure = exc
            finally:
                await job.stop()
                self.training_round = None
                self.metrics.training.set(0)
                structlog.contextvars.unbind_contextvars("round")
                if outcome is None:
                    # Partly trained weights are nobody's: the next SetWeights makes the model whole again.
                    self._set_weights_identity(NOT_TRAINABLE, "")
                    log.warning("training_abandoned", weights_round=self.weights_round)
                else:
                    self.weights_trained = True
        if failure is not None:
            await self._abort(context, failure, "Train")
        self.metrics.trained(outcome.train_seconds, outcome.batches, outcome.samples)
        log.info(
            "training_finished",
            round=request.round,
            samples=outcome.samples,
            loss=round(outcome.mean_loss, 4),
            accuracy=round(outcome.accuracy, 4),
            seconds=round(outcome.train_seconds, 3),
        )
        await context.write(
            pb.TrainUpdate(
                result=pb.TrainResult(
                    round=request.round,
                    round_id=request.round_id,
                    samples=outcome.samples,
                    batches=outcome.batches,
                    mean_loss=outcome.mean_loss,
                    accuracy=outcome.accuracy,
                    train_seconds=outcome.train_seconds,
                    test_loss=outcome.test_loss,
                    test_accuracy=outcome.test_accuracy,
                    test_samples=outcome.test_samples,
                )
            )
        )

    def _keep_base(self, keep: bool) -> None:
        """Before a Train whose update goes back as int8 deltas: keep the weights it starts from."""
        if not keep:
            self._base = None
            return
        self._base = [
            t.detach().reshape(-1).clone() if t.is_floating_point() else None for t in self.model.state_dict().values()
        ]
        if self._residual is None:
            self._residual = [torch.zeros(len(t), dtype=torch.float32) if t is not None else None for t in self._base]

    async def Evaluate(self, request: pb.EvaluateRequest, context: grpc.aio.ServicerContext) -> pb.EvaluateResult:
        try:
            self._check_protocol(context)
            if self._model_lock.locked():
                raise Busy(self._busy_reason() + "; call Evaluate after it has finished")
            if request.round_id and request.round_id != self.weights_round_id:
                raise ProtocolMismatch(
                    f"worker {self.worker_id} holds the weights of round id {self.weights_round_id!r}, asked to "
                    f"evaluate round id {request.round_id!r}: call SetWeights for that round first"
                )
        except (ProtocolMismatch, Busy) as exc:
            await self._abort(context, exc, "Evaluate")
        start = time.perf_counter()
        async with self._model_lock:  # no SetWeights or Train may change the model while it is measured
            self.evaluating = True
            try:
                loss, accuracy, samples = await asyncio.to_thread(self.trainer.evaluate)
            finally:
                self.evaluating = False
        seconds = time.perf_counter() - start
        log.info(
            "weights_evaluated",
            round=self.weights_round,
            round_id=self.weights_round_id,
            samples=samples,
            accuracy=round(accuracy, 4),
            seconds=round(seconds, 3),
        )
        return pb.EvaluateResult(
            round=self.weights_round,
            round_id=self.weights_round_id,
            loss=loss,
            accuracy=accuracy,
            samples=samples,
            seconds=seconds,
        )

    async def GetWeights(self, request: pb.GetWeightsRequest, context: grpc.aio.ServicerContext) -> None:
        # context.write, not a generator: a cancelled stream gives its download slot back at once.
        chunk_size = request.chunk_size or self.limits.default_chunk_bytes
        encoding = request.encoding or pb.CHUNK_ENCODING_RAW
        try:
            self._check_protocol(context)
            if not 0 < chunk_size <= self.limits.max_chunk_bytes:
                raise ValueError(
                    f"chunk_size must be between 1 and {self.limits.max_chunk_bytes} bytes, got {request.chunk_size}"
                )
            if encoding not in serde.SUPPORTED_ENCODINGS:
                raise ValueError(f"unsupported chunk encoding {request.encoding}")
            if self._model_lock.locked():
                raise Busy(self._busy_reason() + "; call GetWeights after Train has finished")
            if encoding == pb.CHUNK_ENCODING_INT8_DELTA and (self._base is None or not self.weights_trained):
                raise ProtocolMismatch(
                    f"worker {self.worker_id} has no int8 delta to send: its weights were not "
                    f"trained by a Train that asked for one (TrainRequest.update_encoding)"
                )
            if self._downloads >= self.limits.max_concurrent_downloads:
                raise TooManyDownloads(
                    f"worker {self.worker_id} already serves {self._downloads} GetWeights streams, "
                    f"its limit; retry when one has finished"
                )
            trailer = None
            if request.digest_in_trailer or encoding in compression.LOSSY:
                trailer = serde.fastest_digest(request.digests or serde.DIGESTS_BEFORE_1_6)
                if trailer is None:
                    raise ValueError(
                        f"none of the digests asked for ({', '.join(request.digests)}) is one this "
                        f"worker computes ({', '.join(serde.DIGESTS)})"
                    )
        except (ValueError, ProtocolMismatch, Busy, TooManyDownloads) as exc:
            await self._abort(context, exc, "GetWeights")
        self._downloads += 1
        try:
            payload = await self._current_snapshot()
            if encoding == pb.CHUNK_ENCODING_INT8_DELTA:
                try:
                    async for chunk in self._int8_update(payload, chunk_size, trailer):
                        await context.write(chunk)
                except ProtocolMismatch as exc:
                    await self._abort(context, exc, "GetWeights")
            else:
                for chunk in payload.chunks(chunk_size, encoding, trailer=trailer, encoded=True):
                    await context.write(chunk)
        finally:
            self._downloads -= 1

    def _int8_update(self, payload: serde.WeightsPayload, chunk_size: int, trailer: str) -> AsyncIterator:
        """The update as int8 deltas, quantised once (the residual moves on once per update) and chunk by chunk as
        the first fetch sends them: a second fetch, e.g. for clipping, replays the same bytes."""
        if self._int8 is None:
            chunks = payload.chunks(
                chunk_size,
                pb.CHUNK_ENCODING_INT8_DELTA,
                trailer=trailer,
                base=self._base,
                residual=self._residual,
                encoded=True,
            )
            self._int8 = (chunk_size, Replay(chunks))
        if self._int8[0] != chunk_size:
            raise ProtocolMismatch(
                f"this update was quantised in {self._int8[0]}-byte chunks (a scale per chunk); "
                f"fetch it again with chunk_size={self._int8[0]}"
            )
        return self._int8[1].replay()

    async def _current_snapshot(self) -> serde.WeightsPayload:
        """The weights as GetWeights streams send them, shared by every stream until they change: the model's own
        tensors, no copy (a copy of a large model costs as much CPU as sending it on loopback)."""
        async with self._model_lock:
            if self._snapshot is None:
                self._snapshot = serde.WeightsPayload(
                    self.model.state_dict(),
                    round=self.weights_round,
                    architecture=self.model_name,
                    round_id=self.weights_round_id,
                    trained=self.weights_trained,
                )
            return self._snapshot

    def _leave_snapshot(self) -> None:
        """Before the model changes (under the model lock): streams still sending the snapshot keep the tensors it
        reads, and the model moves on in copies of them. A slow reader never holds the model up."""
        if self._snapshot is None or not self._downloads:
            return
        with torch.no_grad():
            for t in itertools.chain(self.model.parameters(), self.model.buffers()):
                t.data = t.data.clone()
