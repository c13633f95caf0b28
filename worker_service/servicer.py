"""The fedpi.v1.Worker gRPC servicer: decode, call the plain classes, encode; domain errors become status codes here."""

from __future__ import annotations

import asyncio
import platform
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

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
from fedpi.secagg import OutOfOrder, Unavailable, require
from fedpi.task import Task, fingerprint
from fedpi.weights import compression, serde
from generated.fedpi.v1 import worker_pb2 as pb
from generated.fedpi.v1 import worker_pb2_grpc as pb_grpc
from worker_service.board import Board
from worker_service.metrics import WorkerMetrics
from worker_service.state import Busy, TooManyDownloads, WeightsState
from worker_service.trainer import DEFAULT_MAX_LOCAL_BATCHES, TrainConfig, Trainer, TrainOutcome
from worker_service.training_job import TrainingJob

if TYPE_CHECKING:  # worker_service.secagg needs `cryptography` (fedpi[secure]): imported when first asked for
    from worker_service.secagg import Session

log = structlog.get_logger()

# How a refused weight stream is answered; any other WeightsError is INVALID_ARGUMENT.
WEIGHTS_STATUS = (
    (serde.ArchitectureMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (serde.DigestMismatch, grpc.StatusCode.DATA_LOSS),
    (serde.PayloadTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (serde.UploadTimedOut, grpc.StatusCode.DEADLINE_EXCEEDED),
)


def weights_status(exc: serde.WeightsError) -> grpc.StatusCode:
    return next((code for kind, code in WEIGHTS_STATUS if isinstance(exc, kind)), grpc.StatusCode.INVALID_ARGUMENT)


def check_protocol(context: grpc.aio.ServicerContext) -> None:
    for key, value in context.invocation_metadata() or ():
        if key == VERSION_METADATA_KEY:
            check_compatible(coordinator=value, worker=PROTOCOL_VERSION)


def status_of(exc: Exception) -> grpc.StatusCode:
    if isinstance(exc, serde.WeightsError):
        return weights_status(exc)
    if isinstance(exc, ProtocolMismatch):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, Busy):
        return grpc.StatusCode.ABORTED
    if isinstance(exc, (OutOfOrder, Unavailable)):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, TooManyDownloads):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


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
        board: Board | None = None,
    ):
        self.worker_id = worker_id
        self.board = board or Board()
        self.samples_per_second: float | None = None  # of the last Train that finished
        self.warning = ""  # what is unsafe about how this worker serves (--insecure), for GetInfo
        self.model_name = model_name
        self.model = model
        self.data = data
        self.partition = partition
        self.metrics = metrics or WorkerMetrics(worker_id)
        self.metrics.watch_board(self.board.health)
        self.limits = limits
        self.progress_every = progress_every
        self.trainer = Trainer(model, data, batch_delay=train_delay, max_batches=limits.max_local_batches, task=task)
        self.task = self.trainer.task
        self.manifest = serde.manifest_of(model.state_dict())
        self.fingerprint = fingerprint(self.manifest)
        # Measured now, not by the first GetWeights: on a Pi's CPU share it takes a noticeable part of a second.
        self.digests = serde.digests_by_speed()
        self.state = WeightsState(worker_id, model_name, model)
        self.secagg: Session | None = None  # the secure aggregation of the latest round that asked for one

    # -- helpers ---------------------------------------------------------------------------------------------

    async def _abort(self, context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
        """The one place where domain errors become gRPC status codes."""
        code = status_of(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("request_failed", method=method)
        log.warning("request_rejected", method=method, code=code.name, reason=str(exc), peer=context.peer())
        await context.abort(code, str(exc))

    # -- RPCs ------------------------------------------------------------------------------------------------

    async def GetInfo(self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext) -> pb.WorkerInfo:
        try:
            check_protocol(context)
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
            state=pb.WORKER_STATE_TRAINING if self.state.training_round is not None else pb.WORKER_STATE_IDLE,
            torch_version=torch.__version__,
            cpu_architecture=platform.machine(),
            weights_round=self.state.round,
            max_payload_bytes=self.limits.max_payload_bytes,
            max_chunk_bytes=self.limits.max_chunk_bytes,
            weights_round_id=self.state.round_id,
            weights_trained=self.state.trained,
            max_local_batches=self.limits.max_local_batches,
            task=self.task.name,
            task_version=self.task.version,
            manifest_fingerprint=self.fingerprint,
            digests=self.digests,
            warning=self.warning,
            health=self.board.health(self.samples_per_second),
        )

    async def SetWeights(
        self, request_iterator: AsyncIterator[pb.WeightsChunk], context: grpc.aio.ServicerContext
    ) -> pb.SetWeightsResponse:
        start = time.perf_counter()
        try:
            check_protocol(context)
            self.state.start_upload()  # refused before a byte is read while the model is in use
            try:  # until the upload is installed or dropped: the next one reuses its buffer
                reader = serde.StreamReader(
                    architecture=self.model_name,
                    expected=self.manifest,
                    max_chunk_bytes=self.limits.max_chunk_bytes,
                    max_payload_bytes=self.limits.max_payload_bytes,
                )
                tensors, buffer = await receive_upload(request_iterator, reader, self.limits, self.state.upload_buffer)
                self.state.check_free("weights were not installed, retry after it finishes")
                async with self.state.lock:
                    self.state.install(tensors, buffer, reader.started.round, reader.started.round_id)
                    self.metrics.weights_round.set(self.state.round)
            finally:
                self.state.uploading = False
        except (serde.WeightsError, ProtocolMismatch, Busy) as exc:
            await self._abort(context, exc, "SetWeights")
        seconds = time.perf_counter() - start
        log.info(
            "weights_installed",
            round=self.state.round,
            round_id=self.state.round_id,
            bytes=reader.received,
            seconds=round(seconds, 3),
        )
        return pb.SetWeightsResponse(round=self.state.round, bytes_received=reader.received, seconds=seconds)

    async def Train(self, request: pb.TrainRequest, context: grpc.aio.ServicerContext) -> None:
        # Written with context.write rather than as a generator: a cancelled call then raises inside this coroutine,
        # and the `finally` below stops the training thread before the model lock is given up.
        cfg = TrainConfig.from_request(request)
        try:
            check_protocol(context)
            cfg.validate(len(self.data.train), self.limits.max_local_batches)
            self.state.check_free("one Train at a time")
            self.state.check_trainable(request.round, request.round_id)
        except (ValueError, ProtocolMismatch, Busy) as exc:
            await self._abort(context, exc, "Train")
        outcome: TrainOutcome | None = None
        failure: Exception | None = None
        async with self.state.lock:
            self.state.start_training(
                request.round, request.update_encoding == pb.CHUNK_ENCODING_INT8_DELTA, request.secure_aggregation
            )
            self.metrics.training.set(1)
            structlog.contextvars.bind_contextvars(round=request.round)
            job = TrainingJob(self.trainer, cfg, self.progress_every)
            try:
                while (progress := await job.next_progress(self.progress_every)) is not None:
                    rate = progress.batches_done * cfg.batch_size / progress.seconds if progress.seconds else None
                    progress.health.CopyFrom(self.board.health(rate))
                    await context.write(pb.TrainUpdate(progress=progress))
                try:
                    outcome = job.future.result()
                except Exception as exc:  # a bug or a broken model: report it, keep serving
                    failure = exc
            finally:
                await job.stop()
                self.state.end_training(finished=outcome is not None)
                self.metrics.training.set(0)
                self.metrics.weights_round.set(self.state.round)
                structlog.contextvars.unbind_contextvars("round")
                if outcome is None:
                    log.warning("training_abandoned", weights_round=self.state.round)
        if outcome is None:
            await self._abort(context, failure or RuntimeError("training ended without a result"), "Train")
            return
        self.state.samples = outcome.samples
        self.metrics.trained(outcome.train_seconds, outcome.batches, outcome.samples)
        if outcome.train_seconds > 0:
            self.samples_per_second = outcome.samples / outcome.train_seconds
        regulariser = {"feddyn_alpha": cfg.feddyn_alpha} if cfg.feddyn_alpha else {}  # auto may turn it on mid-run
        log.info("training_finished", round=request.round, **outcome.summary(), **regulariser)
        await context.write(pb.TrainUpdate(result=_result(request, outcome)))

    async def Evaluate(self, request: pb.EvaluateRequest, context: grpc.aio.ServicerContext) -> pb.EvaluateResult:
        try:
            check_protocol(context)
            self.state.check_evaluable(request.round_id)
        except (ProtocolMismatch, Busy) as exc:
            await self._abort(context, exc, "Evaluate")
        start = time.perf_counter()
        async with self.state.evaluation():
            loss, accuracy, samples = await asyncio.to_thread(self.trainer.evaluate)
        seconds = time.perf_counter() - start
        log.info(
            "weights_evaluated",
            round=self.state.round,
            round_id=self.state.round_id,
            samples=samples,
            accuracy=round(accuracy, 4),
            seconds=round(seconds, 3),
        )
        return pb.EvaluateResult(
            round=self.state.round,
            round_id=self.state.round_id,
            loss=loss,
            accuracy=accuracy,
            samples=samples,
            seconds=seconds,
        )

    async def GetWeights(self, request: pb.GetWeightsRequest, context: grpc.aio.ServicerContext) -> None:
        # context.write, not a generator: a cancelled stream gives its download slot back at once.
        try:
            check_protocol(context)
            chunk_size, encoding, trailer = _download(request, self.limits)
            self.state.check_download(encoding, self.limits.max_concurrent_downloads)
        except (ValueError, ProtocolMismatch, Busy, TooManyDownloads) as exc:
            await self._abort(context, exc, "GetWeights")
        self.state.downloads += 1
        try:
            payload = await self.state.snapshot()
            if encoding == pb.CHUNK_ENCODING_INT8_DELTA:
                try:
                    async for chunk in self.state.int8_update(payload, chunk_size, trailer):
                        await context.write(chunk)
                except ProtocolMismatch as exc:
                    await self._abort(context, exc, "GetWeights")
            else:
                for chunk in payload.chunks(chunk_size, encoding, trailer=trailer, encoded=True):
                    await context.write(chunk)
        finally:
            self.state.downloads -= 1

    # -- secure aggregation (worker_service.secagg) ------------------------------------------------------------

    def _session(self, round_id: str) -> Session:
        if self.secagg is None:
            raise OutOfOrder(f"no secure aggregation was set up on this worker (SecAggKeys for {round_id!r})")
        self.secagg.check_round(round_id)
        return self.secagg

    async def SecAggKeys(
        self, request: pb.SecAggKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.SecAggKeysResponse:
        try:
            check_protocol(context)
            require()
            from worker_service.secagg import Session

            session = Session(request.config)
        except (ValueError, ProtocolMismatch, Unavailable) as exc:
            await self._abort(context, exc, "SecAggKeys")
        self.secagg = session
        log.info("secagg_keys_made", round_id=session.round_id, index=session.me, neighbours=len(session.neighbours))
        return session.public_keys()

    async def SecAggShares(
        self, request: pb.SecAggSharesRequest, context: grpc.aio.ServicerContext
    ) -> pb.SecAggSharesResponse:
        try:
            check_protocol(context)
            response = self._session(request.round_id).shares(request.peers)
        except (ValueError, ProtocolMismatch, OutOfOrder) as exc:
            await self._abort(context, exc, "SecAggShares")
        return response

    async def GetMaskedUpdate(self, request: pb.GetMaskedUpdateRequest, context: grpc.aio.ServicerContext) -> None:
        try:
            check_protocol(context)
            session = self._session(request.round_id)
            chunk_size = request.chunk_size or self.limits.default_chunk_bytes
            if not 0 < chunk_size <= self.limits.max_chunk_bytes or chunk_size % 4:
                raise ValueError(
                    f"chunk_size must be a multiple of 4 between 4 and {self.limits.max_chunk_bytes} bytes, "
                    f"got {request.chunk_size}"
                )
            self.state.check_masked(request.round_id, self.limits.max_concurrent_downloads)
            elements = chunk_size // 4
            coordinates = sum(t.numel() for t in self.model.state_dict().values() if t.is_floating_point())
            chunks = session.masked_update(
                request.peers, partial(self.state.deltas, elements), coordinates, self.state.samples, chunk_size
            )
        except (ValueError, ProtocolMismatch, OutOfOrder, Busy, TooManyDownloads) as exc:
            await self._abort(context, exc, "GetMaskedUpdate")
        self.state.downloads += 1  # an install meanwhile leaves the tensors this stream reads
        try:
            header = pb.MaskedUpdateHeader(round_id=session.round_id, elements=session.elements(coordinates))
            await context.write(pb.MaskedChunk(header=header))
            while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
                await context.write(chunk)
        finally:
            self.state.downloads -= 1

    async def SecAggUnmask(
        self, request: pb.SecAggUnmaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.SecAggUnmaskResponse:
        try:
            check_protocol(context)
            response = self._session(request.round_id).unmask(request)
        except (ValueError, ProtocolMismatch, OutOfOrder) as exc:
            await self._abort(context, exc, "SecAggUnmask")
        log.info(
            "secagg_unmasked",
            round_id=request.round_id,
            survivors=len(request.survivors),
            dropped=len(request.dropped),
        )
        return response


async def receive_upload(
    request_iterator: AsyncIterator[pb.WeightsChunk],
    reader: serde.StreamReader,
    limits: Limits,
    buffer: bytearray | None,
) -> tuple[dict[str, torch.Tensor], bytearray]:
    """Read and check a whole upload within its deadline: upload_grace for the header, then time for its size."""
    assembler = serde.Assembler(reader, buffer)
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
                    allowed = limits.upload_grace + reader.started.total_bytes / limits.upload_bytes_per_second
                    deadline.reschedule(loop.time() + allowed)
    except TimeoutError:
        raise serde.UploadTimedOut(
            f"SetWeights stream took longer than the {allowed:.0f} s its size allows "
            f"({reader.received} of {reader.header.total_bytes if reader.header else '?'} bytes arrived); "
            f"nothing was installed"
        ) from None
    tensors = assembler.finish()  # a stream that ends before its header fails here
    return tensors, assembler.buffer or bytearray()


def _result(request: pb.TrainRequest, outcome: TrainOutcome) -> pb.TrainResult:
    return pb.TrainResult(
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
        dp_epsilon=outcome.dp_epsilon,
    )


def _download(request: pb.GetWeightsRequest, limits: Limits) -> tuple[int, int, str | None]:
    """What a GetWeights asks for: chunk size, encoding and trailer digest (None: the digest is in the header)."""
    chunk_size = request.chunk_size or limits.default_chunk_bytes
    encoding = request.encoding or pb.CHUNK_ENCODING_RAW
    if not 0 < chunk_size <= limits.max_chunk_bytes:
        raise ValueError(f"chunk_size must be between 1 and {limits.max_chunk_bytes} bytes, got {request.chunk_size}")
    if encoding not in serde.SUPPORTED_ENCODINGS:
        raise ValueError(f"unsupported chunk encoding {request.encoding}")
    trailer = None
    if request.digest_in_trailer or encoding in compression.LOSSY:
        trailer = serde.fastest_digest(request.digests or serde.DIGESTS_BEFORE_1_6)
        if trailer is None:
            raise ValueError(
                f"none of the digests asked for ({', '.join(request.digests)}) is one this "
                f"worker computes ({', '.join(serde.DIGESTS)})"
            )
    return chunk_size, encoding, trailer
