"""The fedpi.v1.Worker gRPC servicer: decode, call the plain classes, encode; domain errors become status codes here."""

from __future__ import annotations

import asyncio
import platform
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import structlog
import torch

import fedpi
from fedpi import serde
from fedpi.data import Dataset
from fedpi.models import parameter_count
from fedpi.protocol import PROTOCOL_VERSION, VERSION_METADATA_KEY, ProtocolMismatch, check_compatible
from generated.fedpi.v1 import worker_pb2 as pb
from generated.fedpi.v1 import worker_pb2_grpc as pb_grpc
from worker_service.trainer import TrainConfig, Trainer, TrainingCancelled, TrainOutcome

log = structlog.get_logger()

NOT_TRAINABLE = -1  # weights_round after an interrupted Train: the next SetWeights makes the model whole again


@dataclass(frozen=True)
class Limits:
    max_chunk_bytes: int = serde.DEFAULT_MAX_CHUNK_BYTES
    max_payload_bytes: int = serde.DEFAULT_MAX_PAYLOAD_BYTES
    default_chunk_bytes: int = serde.DEFAULT_CHUNK_BYTES


class Busy(Exception):
    """Another call holds the model (training, or another upload): the caller should retry later."""


class WorkerServicer(pb_grpc.WorkerServicer):
    def __init__(self, *, worker_id: str, model_name: str, model: torch.nn.Module, data: Dataset,
                 partition: str, limits: Limits = Limits(), progress_every: float = 2.0, train_delay: float = 0.0):
        self.worker_id = worker_id
        self.model_name = model_name
        self.model = model
        self.data = data
        self.partition = partition
        self.limits = limits
        self.progress_every = progress_every
        self.trainer = Trainer(model, data, batch_delay=train_delay)
        self.manifest = serde.manifest_of(model.state_dict())
        self.weights_round = 0  # the deterministic initial weights
        self.training_round: int | None = None
        self._model_lock = asyncio.Lock()  # held while training or installing: the model is never seen half-done
        self._upload_active = False  # one upload at a time bounds the memory held by partial uploads

    # -- helpers ---------------------------------------------------------------------------------------------

    def _check_protocol(self, context: grpc.aio.ServicerContext) -> None:
        for key, value in context.invocation_metadata() or ():
            if key == VERSION_METADATA_KEY:
                check_compatible(coordinator=value, worker=PROTOCOL_VERSION)

    def _busy_reason(self) -> str:
        if self.training_round is not None:
            return f"worker {self.worker_id} is training round {self.training_round}"
        return f"worker {self.worker_id} is installing weights"

    async def _abort(self, context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
        """The one place where domain errors become gRPC status codes."""
        if isinstance(exc, serde.WeightsError):
            code = grpc.StatusCode[exc.status]
        elif isinstance(exc, ProtocolMismatch):
            code = grpc.StatusCode.FAILED_PRECONDITION
        elif isinstance(exc, Busy):
            code = grpc.StatusCode.ABORTED
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
        )

    async def SetWeights(self, request_iterator: AsyncIterator[pb.WeightsChunk],
                         context: grpc.aio.ServicerContext) -> pb.SetWeightsResponse:
        start = time.perf_counter()
        try:
            self._check_protocol(context)
            if self._upload_active:
                raise Busy(f"worker {self.worker_id} is receiving another SetWeights stream; retry when it is done")
            self._upload_active = True
            try:
                reader = serde.StreamReader(
                    architecture=self.model_name, expected=self.manifest,
                    max_chunk_bytes=self.limits.max_chunk_bytes, max_payload_bytes=self.limits.max_payload_bytes,
                )
                assembler = serde.Assembler(reader)
                async for chunk in request_iterator:
                    assembler.add(chunk)
                state = assembler.finish()
            finally:
                self._upload_active = False
            if self._model_lock.locked():
                raise Busy(self._busy_reason() + "; weights were not installed, retry after it finishes")
            async with self._model_lock:
                self.model.load_state_dict(state)
                self.weights_round = reader.header.round
        except (serde.WeightsError, ProtocolMismatch, Busy) as exc:
            await self._abort(context, exc, "SetWeights")
        seconds = time.perf_counter() - start
        log.info("weights_installed", round=self.weights_round, bytes=reader.received, seconds=round(seconds, 3))
        return pb.SetWeightsResponse(round=self.weights_round, bytes_received=reader.received, seconds=seconds)

    async def Train(self, request: pb.TrainRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.TrainUpdate]:
        cfg = TrainConfig(
            local_batches=request.local_batches, local_epochs=request.local_epochs, batch_size=request.batch_size,
            learning_rate=request.learning_rate, momentum=request.momentum, seed=request.seed,
            evaluate=request.evaluate,
        )
        try:
            self._check_protocol(context)
            cfg.validate(len(self.data.train))
            if self._model_lock.locked():
                raise Busy(self._busy_reason() + "; one Train at a time")
            if request.round != self.weights_round:
                raise ProtocolMismatch(
                    f"worker {self.worker_id} holds the weights of round {self.weights_round}, asked to train "
                    f"round {request.round}: call SetWeights for round {request.round} first"
                )
        except (ValueError, ProtocolMismatch, Busy) as exc:
            await self._abort(context, exc, "Train")
        async with self._model_lock:
            self.training_round = request.round
            structlog.contextvars.bind_contextvars(round=request.round)
            try:
                async for update in self._train_updates(cfg, context):
                    yield update
            finally:
                self.training_round = None
                structlog.contextvars.unbind_contextvars("round")

    async def _train_updates(self, cfg: TrainConfig,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.TrainUpdate]:
        """Run the trainer in a thread; relay its progress; stop it if the caller goes away."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[pb.TrainProgress] = asyncio.Queue()
        cancelled = threading.Event()

        def progress(done: int, total: int, loss: float, seconds: float) -> None:
            msg = pb.TrainProgress(batches_done=done, batches_total=total, mean_loss=loss, seconds=seconds)
            loop.call_soon_threadsafe(queue.put_nowait, msg)

        round_ = self.training_round
        job = loop.run_in_executor(None, self.trainer.train, cfg, progress, cancelled, self.progress_every)
        last = pb.TrainProgress()
        finished = False
        try:
            while not job.done() or not queue.empty():
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, job}, timeout=self.progress_every, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    last = getter.result()
                    yield pb.TrainUpdate(progress=last)
                    continue
                getter.cancel()
                if not job.done():
                    # A heartbeat inside a long batch: the caller's idle timeout measures liveness, not batch length.
                    yield pb.TrainUpdate(progress=last)
            try:
                outcome: TrainOutcome = job.result()
            except TrainingCancelled:
                raise
            except Exception as exc:  # a bug or a broken model: report it, keep serving
                await self._abort(context, exc, "Train")
            finished = True
        finally:
            if not finished:
                # The caller left or training failed: stop the thread before giving up the model lock.
                cancelled.set()
                await asyncio.wait({job})
                self.weights_round = NOT_TRAINABLE
                log.warning("training_abandoned", weights_round=self.weights_round)
        log.info("training_finished", samples=outcome.samples, loss=round(outcome.mean_loss, 4),
                 accuracy=round(outcome.accuracy, 4), seconds=round(outcome.train_seconds, 3))
        yield pb.TrainUpdate(result=pb.TrainResult(
            round=round_, samples=outcome.samples, batches=outcome.batches, mean_loss=outcome.mean_loss,
            accuracy=outcome.accuracy, train_seconds=outcome.train_seconds, test_loss=outcome.test_loss,
            test_accuracy=outcome.test_accuracy, test_samples=outcome.test_samples,
        ))

    async def GetWeights(self, request: pb.GetWeightsRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[pb.WeightsChunk]:
        chunk_size = request.chunk_size or self.limits.default_chunk_bytes
        encoding = request.encoding or pb.CHUNK_ENCODING_RAW
        try:
            self._check_protocol(context)
            if not 0 < chunk_size <= self.limits.max_chunk_bytes:
                raise ValueError(f"chunk_size must be between 1 and {self.limits.max_chunk_bytes} bytes, "
                                 f"got {request.chunk_size}")
            if encoding not in serde.SUPPORTED_ENCODINGS:
                raise ValueError(f"unsupported chunk encoding {request.encoding}")
            if self._model_lock.locked():
                raise Busy(self._busy_reason() + "; call GetWeights after Train has finished")
        except (ValueError, ProtocolMismatch, Busy) as exc:
            await self._abort(context, exc, "GetWeights")
        async with self._model_lock:
            # A snapshot, so that a slow reader never holds the model.
            snapshot = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            round_ = self.weights_round
        payload = serde.WeightsPayload(snapshot, round=round_, architecture=self.model_name)
        for chunk in payload.chunks(chunk_size, encoding):
            yield chunk
