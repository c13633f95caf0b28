"""The round loop: every worker concurrently receives the global model, trains, and streams its update back into
the aggregate. Failures are collected per worker and handed to the strategy; they never hang a round.

A round has four steps, each a method below: train (send the model, train, check the result), fold (stream an update
into the FedAvg sum as soon as its worker is done, or, for coordinate-wise rules, walk every update in step once all
are done), settle (who failed, and does anything of theirs sit in the sum), install (the aggregate replaces the
global model only if it is finite)."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import TypeVar

import structlog
import torch

from coordinator_service.engine.aggregate import (
    DeltaFold,
    NonFiniteAggregate,
    UpdateCheck,
    WeightedSum,
    fits,
    flat_reference,
    install,
    is_float,
    model_norm,
)
from coordinator_service.engine.observer import RunObserver
from coordinator_service.engine.robust import Aggregation, CoordinateReducer, StepFailed
from coordinator_service.engine.worker_client import (
    WorkerClient,
    WorkerError,
    WorkerIncompatible,
    WorkerRejected,
    elapsed,
    offered,
    speaks,
    upload_digest,
)
from coordinator_service.policy.server_opt import ServerOptimizer
from coordinator_service.policy.strategy import Failure, Strategy
from fedpi.net.protocol import ProtocolMismatch, check_minimum
from fedpi.weights import compression, serde
from generated.fedpi.v1 import worker_pb2 as pb

log = structlog.get_logger()

# After a failed update stream the sum is rebuilt from the good workers; this bounds how often.
MAX_AGGREGATION_ATTEMPTS = 3
T = TypeVar("T")
# Chunks of one update read ahead of the one being folded: the stream keeps moving while the weights thread works.
FOLD_AHEAD = 8
# An update further than this many times the global model's norm (L2, at least 1) from the global model it was
# trained from is refused. Honest local training moves a model by a small fraction of its norm per round (README:
# Robust aggregation); a factor of 10 leaves room for high learning rates and catches overflow-sized values.
DEFAULT_MAX_UPDATE_RATIO = 10.0


class RoundFailed(Exception):
    """Too few workers finished the round for its average to count; the global model is unchanged."""

    def __init__(self, message: str, failures: Sequence[Failure] = ()):
        super().__init__(message)
        self.failures = list(failures)


@dataclass
class WorkerRound:
    worker: str
    samples: int = 0
    train_seconds: float = 0.0
    train_loss: float = 0.0
    train_accuracy: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    send_seconds: float = 0.0
    receive_seconds: float = 0.0
    update_distance: float = 0.0  # L2 distance of its update from the global model it was trained from
    batches: int = 0
    eval_loss: float = 0.0  # federated evaluation: the new global model on this worker's local test split
    eval_accuracy: float = 0.0
    eval_samples: int = 0

    @property
    def receive_mb_per_s(self) -> float:
        return self.bytes_received / self.receive_seconds / 1e6 if self.receive_seconds else 0.0

    @property
    def send_mb_per_s(self) -> float:
        return self.bytes_sent / self.send_seconds / 1e6 if self.send_seconds else 0.0


@dataclass
class RoundReport:
    round: int
    workers: list[WorkerRound] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    # Workers the run knows that took no part in the round, and why (phase "refused" or "unavailable").
    absent: list[Failure] = field(default_factory=list)
    test_loss: float | None = None  # None: the task gives the coordinator no test data
    test_accuracy: float | None = None
    evaluation_seconds: float = 0.0  # of test_loss / test_accuracy: while the next round trains, unless sequential
    aggregation_seconds: float = 0.0
    wall_seconds: float = 0.0
    max_update_distance: float = 0.0  # the bound this round's updates were held to
    aggregation: str = "fedavg"
    aggregate_scale: float = 1.0  # how far the model moved towards the aggregate (FedNova: > 1)
    federated_loss: float | None = None  # the weighted mean of the workers' evaluations, when asked for
    federated_accuracy: float | None = None
    federated_samples: int = 0

    @property
    def overhead_seconds(self) -> float:
        """Round wall time beyond the slowest worker's pure training (the coordinator's evaluation is not in the
        round's wall time: see RoundFinisher)."""
        return self.wall_seconds - max((w.train_seconds for w in self.workers), default=0.0)

    def as_event(self) -> dict:
        return {
            "round": self.round,
            **(
                {"test_accuracy": round(self.test_accuracy, 4), "test_loss": round(self.test_loss, 4)}
                if self.test_accuracy is not None
                else {}
            ),
            "wall_seconds": round(self.wall_seconds, 3),
            "overhead_seconds": round(self.overhead_seconds, 3),
            "aggregation_seconds": round(self.aggregation_seconds, 3),
            **({"evaluation_seconds": round(self.evaluation_seconds, 3)} if self.test_accuracy is not None else {}),
            "aggregation": self.aggregation,
            "max_update_distance": round(self.max_update_distance, 4),
            "aggregate_scale": round(self.aggregate_scale, 4),
            **(
                {
                    "federated_accuracy": round(self.federated_accuracy, 4),
                    "federated_loss": round(self.federated_loss, 4),
                    "federated_samples": self.federated_samples,
                }
                if self.federated_accuracy is not None
                else {}
            ),
            "samples": sum(w.samples for w in self.workers),
            "workers": {
                w.worker: {
                    **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(w).items() if k != "worker"},
                    "send_mb_per_s": round(w.send_mb_per_s, 2),
                    "receive_mb_per_s": round(w.receive_mb_per_s, 2),
                }
                for w in self.workers
            },
            "failures": [asdict(f) for f in self.failures],
            "absent": [asdict(f) for f in self.absent],
        }


@dataclass(frozen=True)
class TransferSettings:
    chunk_size: int = serde.DEFAULT_CHUNK_BYTES
    encoding: int = pb.CHUNK_ENCODING_RAW  # of the workers' updates (--compression)
    model_encoding: int = pb.CHUNK_ENCODING_RAW  # of the global model sent down: exact unless asked otherwise


class _PhaseError(Exception):
    def __init__(self, phase: str, cause: BaseException):
        super().__init__(str(cause))
        self.phase = phase
        self.cause = cause


@dataclass
class Contribution:
    """A worker that finished training this round, and what is known of its update."""

    client: WorkerClient
    stats: WorkerRound
    result: pb.TrainResult
    weight: float
    check: UpdateCheck | None = None  # the last measurement of its update (distance from the global model)
    digest: str = ""  # of its update, as first fetched: a second fetch must bring the same bytes


@dataclass
class _Round:
    """What every step of one round needs."""

    number: int
    round_id: str
    payload: serde.WeightsPayload
    reference: list[torch.Tensor]  # the global model, flat, as sent
    max_distance: float
    report: RoundReport
    folding: set[str] = field(default_factory=set)  # workers whose update has started to enter the sum
    aggregation_seconds: float = 0.0
    sends: dict[str, serde.Broadcast] = field(default_factory=dict)  # the payload as each worker is sent it
    announced: asyncio.Task | None = None  # round_started is logged
    unsent: int = 0  # workers whose send of the global model has not ended yet
    sent: asyncio.Event = field(default_factory=asyncio.Event)  # every send has ended, well or not

    def send_ended(self) -> None:
        self.unsent -= 1
        if self.unsent <= 0:
            self.sent.set()


class RoundRunner:
    """Runs rounds against one global model, each with the workers present at its start."""

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        architecture: str,
        strategy: Strategy,
        transfer: TransferSettings = TransferSettings(),
        round_timeout: float = 3600.0,
        aggregation: Aggregation = Aggregation(),
        max_update_ratio: float = DEFAULT_MAX_UPDATE_RATIO,
        run_id: str | None = None,
        server_optimizer: ServerOptimizer | None = None,
        federated_evaluation: bool = False,
        observer: RunObserver | None = None,
    ):
        self.model = model
        self.architecture = architecture
        self.strategy = strategy
        self.transfer = transfer
        self.round_timeout = round_timeout
        self.aggregation = aggregation
        self.max_update_ratio = max_update_ratio
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.server_optimizer = server_optimizer or ServerOptimizer()
        self.federated_evaluation = federated_evaluation
        self.observer = observer or RunObserver()
        self._attempts = 0  # every call gets its own round id, so a retried round never mixes with its first try
        self._cpu = ThreadPoolExecutor(1, thread_name_prefix="fedpi-weights")
        self._accumulators: list[torch.Tensor] | None = None

    async def run_round(
        self, server_round: int, clients: Sequence[WorkerClient], index_of: Callable[[WorkerClient], int] | None = None
    ) -> RoundReport:
        """One round. `index_of` gives each worker a stable number for its seed (default: its position)."""
        clients = list(clients)
        index_of = index_of or clients.index
        structlog.contextvars.bind_contextvars(round=server_round)
        try:
            return await self._run_round(
                server_round, self.strategy.sample(server_round, clients, index_of), index_of, present=len(clients)
            )
        finally:
            structlog.contextvars.unbind_contextvars("round")

    def _new_sum(self, rnd: _Round) -> WeightedSum:
        """A sum in last round's accumulators: the model they were installed into holds its own copy by now."""
        total = WeightedSum(rnd.payload.manifest, self._accumulators)
        self._accumulators = total.accumulators
        return total

    async def _off_loop(self, work: Callable, *args):
        """CPU work on the global model and the sum (preparing, folding, averaging) runs on one thread of its own:
        the event loop keeps moving bytes meanwhile, and folds into the shared sum never race."""
        return await asyncio.get_running_loop().run_in_executor(self._cpu, work, *args)

    def _aggregate_soon(self, step: Callable, *args) -> Future[float]:
        """Queue one step of aggregation on the weights thread now (steps run in the order queued); its result is the
        time it worked, which the round counts rather than the time several workers' chunks waited in the queue. A
        plain future: the event loop is woken for it only if something waits for it before it is done."""

        def timed() -> float:
            t = time.perf_counter()
            step(*args)
            return elapsed(t)

        return self._cpu.submit(timed)

    async def _aggregate(self, rnd: _Round, step: Callable, *args) -> None:
        rnd.aggregation_seconds += await _result(self._aggregate_soon(step, *args))

    async def _prepare(self, number: int) -> _Round:
        self._attempts += 1
        round_id = f"{self.run_id}/{number}.{self._attempts}"
        state = self.model.state_dict()
        payload = serde.WeightsPayload(state, round=number, architecture=self.architecture, round_id=round_id)
        reference = flat_reference(state, payload.manifest)
        max_distance = self.max_update_ratio * max(model_norm(reference, payload.manifest), 1.0)
        return _Round(number, round_id, payload, reference, max_distance, RoundReport(number))

    async def _announce(self, rnd: _Round, clients: list[WorkerClient], present: int) -> None:
        """Log round_started with the model's sha256 digest, hashed on the weights thread once the model is out and
        the workers train: beside the sends it would slow them (workers check the digest their stream carries, not
        this one)."""
        await rnd.sent.wait()
        digest = await self._off_loop(lambda: rnd.payload.digest)
        log.info(
            "round_started",
            workers=[c.name for c in clients],
            present=present,
            round_id=rnd.round_id,
            model_digest=digest,
        )

    async def _run_round(
        self, number: int, clients: list[WorkerClient], index_of: Callable[[WorkerClient], int], present: int
    ) -> RoundReport:
        start = time.perf_counter()
        rnd = await self._prepare(number)
        rnd.unsent = len(clients)
        if not clients:
            rnd.sent.set()
        rnd.announced = asyncio.create_task(self._announce(rnd, clients, present))
        self.observer.round_started(number, [c.name for c in clients])
        rnd.sends = self._broadcasts(rnd.payload, clients)
        if self.aggregation.coordinate_wise:
            total = None
            steps = [self._train(rnd, c, index_of(c)) for c in clients]
        else:
            total = self._new_sum(rnd)
            steps = [self._train_and_fold(rnd, c, index_of(c), total) for c in clients]
        outcomes = await asyncio.gather(
            *(asyncio.wait_for(s, self.round_timeout) for s in steps), return_exceptions=True
        )
        await rnd.announced
        done, tainted = self._settle(rnd, clients, outcomes)
        if self.aggregation.coordinate_wise:
            await self._aggregate_coordinate_wise(rnd, done, clients)
        else:
            await self._aggregate_weighted(rnd, done, clients, total, tainted)
        report = rnd.report
        for c in done:
            c.stats.update_distance = c.check.distance if c.check is not None else 0.0
        report.workers = [c.stats for c in done]
        report.max_update_distance, report.aggregation = rnd.max_distance, str(self.aggregation)
        report.aggregation_seconds = rnd.aggregation_seconds
        log.debug("weights_aggregated", contributors=len(done), rule=str(self.aggregation))
        if self.federated_evaluation:
            await self._evaluate_federated(rnd, done)
        report.wall_seconds = elapsed(start)
        return report

    def _broadcasts(self, payload: serde.WeightsPayload, clients: list[WorkerClient]) -> dict[str, serde.Broadcast]:
        """The payload as each worker is sent it: one stream per encoding and digest, serialised once for all the
        workers that take it that way."""
        ways = {c.name: (offered(c, self.transfer.model_encoding), upload_digest(c)) for c in clients}
        shared = {
            way: payload.broadcast(count, self.transfer.chunk_size, *way)
            for way, count in Counter(ways.values()).items()
        }
        return {name: shared[way] for name, way in ways.items()}

    async def _aggregate_coordinate_wise(
        self, rnd: _Round, done: list[Contribution], clients: list[WorkerClient]
    ) -> None:
        self._require_quorum(rnd, done, clients)
        flat = await self._coordinate_wise(rnd, done)
        self._require_quorum(rnd, done, clients)
        for c in done:
            self.observer.worker_phase(c.client.name, "done")
        self._install(rnd, flat)

    async def _aggregate_weighted(
        self, rnd: _Round, done: list[Contribution], clients: list[WorkerClient], total: WeightedSum, tainted: bool
    ) -> None:
        """FedAvg's sum (rebuilt if a failed worker left part of its update in it), clipped if asked, installed."""
        if tainted:
            total = await self._refold(rnd, done)
        self._require_quorum(rnd, done, clients)
        if self.aggregation.rule == "clipped":
            await self._clip(rnd, done, total)
        t = time.perf_counter()
        try:
            flat = await self._off_loop(total.mean)
        except NonFiniteAggregate as exc:
            raise RoundFailed(f"round {rnd.number}: {exc}", rnd.report.failures) from None
        rnd.report.aggregate_scale = self.strategy.aggregate_scale([c.result for c in done])
        await self._off_loop(self._install, rnd, flat, rnd.report.aggregate_scale)
        rnd.aggregation_seconds += elapsed(t)

    # -- step 1: train -----------------------------------------------------------------------------------------

    async def _train(self, rnd: _Round, client: WorkerClient, index: int) -> Contribution:
        """Send the global model, train, and check the result before anything of the update is used."""
        stats = WorkerRound(client.name)
        t = time.perf_counter()
        self.observer.worker_phase(client.name, "sending")
        try:
            stats.bytes_sent = await client.set_weights(rnd.sends[client.name], rnd.payload.total_bytes)
        except WorkerError as exc:
            raise _PhaseError("set_weights", exc) from exc
        finally:
            rnd.send_ended()
        stats.send_seconds = elapsed(t)
        request = self.strategy.configure_train(rnd.number, index)
        request.round_id = rnd.round_id
        if speaks(client, "1.5"):
            request.update_encoding = offered(client, self.transfer.encoding)
        self.observer.worker_phase(client.name, "training")
        try:
            _check_worker_supports(client, request)
            result = await client.train(request, partial(self.observer.worker_progress, client.name))
            self._check_result(rnd, client, request, result)
        except WorkerError as exc:
            raise _PhaseError("train", exc) from exc
        stats.samples, stats.train_seconds, stats.batches = result.samples, result.train_seconds, result.batches
        stats.train_loss, stats.train_accuracy = result.mean_loss, result.accuracy
        await rnd.announced  # round_started is logged before anything of its workers
        log.info(
            "worker_train_finished",
            worker=client.name,
            samples=result.samples,
            seconds=round(result.train_seconds, 3),
            loss=round(result.mean_loss, 4),
        )
        return Contribution(client, stats, result, self.strategy.weight(result))

    def _check_result(
        self, rnd: _Round, client: WorkerClient, request: pb.TrainRequest, result: pb.TrainResult
    ) -> None:
        if result.round_id != rnd.round_id:
            raise WorkerRejected(
                client.name,
                f"Train answered for round id {result.round_id!r}, expected {rnd.round_id!r}; its update was refused",
            )
        shard = client.info.train_samples if client.info is not None else 0
        max_batches = client.info.max_local_batches if client.info is not None else 0
        bound = self.strategy.max_samples(request, shard, max_batches)
        if not 0 < result.samples <= bound:
            raise WorkerRejected(
                client.name,
                f"reported {result.samples} training samples, outside 1..{bound} (what the round asked "
                f"for: {_work_asked(request)} on a shard of {shard}); its update was refused",
            )

    # -- step 2: fold ------------------------------------------------------------------------------------------

    async def _train_and_fold(self, rnd: _Round, client: WorkerClient, index: int, total: WeightedSum) -> Contribution:
        contribution = await self._train(rnd, client, index)
        rnd.folding.add(client.name)
        self.observer.worker_phase(client.name, "receiving")
        try:
            await self._fold(rnd, contribution, total)
        except (WorkerError, serde.WeightsError) as exc:
            raise _PhaseError("get_weights", exc) from exc
        self.observer.worker_phase(client.name, "done")
        return contribution

    async def _update_pieces(self, rnd: _Round, c: Contribution) -> AsyncIterator[bytes]:
        """One worker's update as validated raw pieces, cut as the chunk size and encoding asked for (so every
        worker's pieces line up); its length and digest are checked when it ends. It must be the trained update of
        this round's id."""
        t = time.perf_counter()
        payload, chunk_size = rnd.payload, self.transfer.chunk_size
        encoding = offered(c.client, self.transfer.encoding)
        reader = serde.StreamReader(
            architecture=self.architecture,
            expected=payload.manifest,
            max_payload_bytes=max(payload.total_bytes, 1),
            encodings=(encoding,),
            base=rnd.reference if encoding == compression.INT8 else None,
        )
        sizes = serde.piece_sizes(payload.manifest, chunk_size, encoding)
        stream = c.client.get_weights(chunk_size, encoding, payload.total_bytes, speaks(c.client, "1.5"))
        async for chunk in stream:
            offset = reader.received
            # A slow digest is computed on threads of each stream's own, beside the one thread that folds.
            raw = reader.accept(chunk) if reader.hashes_fast else await asyncio.to_thread(reader.accept, chunk)
            if raw is None:
                if serde.is_header(chunk):
                    _check_update_header(reader.header, rnd)
                continue
            if len(raw) != next(sizes, 0):
                raise serde.MalformedStream(
                    f"chunk at offset {offset} holds {len(raw)} bytes, not what "
                    f"{chunk_size}-byte chunks of this encoding hold"
                )
            yield raw
        reader.finish()
        if c.digest and reader.digest != c.digest:
            raise serde.MalformedStream("the update changed between two fetches of the same round")
        c.digest = reader.digest
        c.stats.bytes_received, c.stats.receive_seconds = reader.wire_bytes, elapsed(t)

    def _check(self, rnd: _Round) -> UpdateCheck:
        return UpdateCheck(rnd.payload.manifest, rnd.reference, rnd.max_distance)

    async def _fold(self, rnd: _Round, c: Contribution, total: WeightedSum) -> None:
        """Stream one worker's update straight into the running sum, chunk by chunk. The next chunks are read while
        earlier ones are folded, up to FOLD_AHEAD of them; once a chunk fails its check, no later one is folded."""
        fold = total.stream(c.weight, self._check(rnd))
        queued: deque[Future[float]] = deque()
        try:
            async for raw in self._update_pieces(rnd, c):
                queued.append(self._aggregate_soon(fold.add, raw))
                while queued and (len(queued) > FOLD_AHEAD or queued[0].done()):
                    rnd.aggregation_seconds += await _result(queued.popleft())
        finally:  # a failed stream still waits for its queued folds: none may run after the round moves on
            outcomes = await asyncio.gather(*map(asyncio.wrap_future, queued), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            rnd.aggregation_seconds += outcome
        fold.finish()
        c.check = fold.check

    async def _refold(self, rnd: _Round, done: list[Contribution]) -> WeightedSum:
        """Rebuild the sum from the workers whose updates are still good; drop any that fail again."""
        for attempt in range(MAX_AGGREGATION_ATTEMPTS):
            log.warning("aggregation_restarted", attempt=attempt + 1, workers=[c.client.name for c in done])
            total = self._new_sum(rnd)
            outcomes = await asyncio.gather(*(self._fold(rnd, c, total) for c in done), return_exceptions=True)
            failed = [(c, o) for c, o in zip(done, outcomes) if isinstance(o, BaseException)]
            for c, outcome in failed:
                self._drop(rnd, done, c, "get_weights", outcome)
            if not failed:
                return total
        raise RoundFailed(f"round {rnd.number}: worker updates kept failing to arrive intact", rnd.report.failures)

    async def _clip(self, rnd: _Round, done: list[Contribution], total: WeightedSum) -> None:
        """Scale every update further than the clipping norm back onto it: a second fetch of those updates only,
        whose difference from the global model is folded in again with weight x (norm / distance - 1)."""
        distances = [c.check.distance for c in done]
        norm = self.aggregation.clip_norm or statistics.median(distances)
        for c in [c for c in done if c.check.distance > norm]:
            scale = norm / c.check.distance
            log.info(
                "update_clipped", worker=c.client.name, distance=round(c.check.distance, 4), clip_norm=round(norm, 4)
            )
            fold = DeltaFold(total, c.weight * (scale - 1), self._check(rnd), rnd.reference)
            try:
                async for raw in self._update_pieces(rnd, c):
                    await self._off_loop(fold.add, raw)
                fold.finish()
            except (WorkerError, serde.WeightsError) as exc:
                # Part of the correction is in the sum: what is there now is no longer any worker's update.
                raise RoundFailed(
                    f"round {rnd.number}: {c.client.name}'s update could not be fetched again to clip it ({exc})",
                    rnd.report.failures,
                ) from exc

    async def _coordinate_wise(self, rnd: _Round, done: list[Contribution]) -> list[torch.Tensor]:
        """Median or trimmed mean of every update, walked in step; a worker that breaks the walk is dropped and the
        walk starts again without it."""
        for attempt in range(MAX_AGGREGATION_ATTEMPTS + 1):
            trim = self.aggregation.trim_for(len(done)) if self.aggregation.rule == "trimmed-mean" else None
            try:
                return await self._reduce(rnd, done, trim)
            except StepFailed as exc:
                self._drop(rnd, done, done[exc.position], "get_weights", exc.cause)
            except ValueError as exc:  # too few updates left for the rule
                raise RoundFailed(f"round {rnd.number}: {exc}", rnd.report.failures) from None
            log.warning("aggregation_restarted", attempt=attempt + 1, workers=[c.client.name for c in done])
        raise RoundFailed(f"round {rnd.number}: worker updates kept failing to arrive intact", rnd.report.failures)

    async def _reduce(self, rnd: _Round, done: list[Contribution], trim: int | None) -> list[torch.Tensor]:
        checks = [self._check(rnd) for _ in done]
        reducer = CoordinateReducer(rnd.payload.manifest, checks, trim)
        streams = [self._update_pieces(rnd, c) for c in done]
        try:
            while True:
                pieces = await asyncio.gather(*(anext(s, None) for s in streams), return_exceptions=True)
                for position, piece in enumerate(pieces):
                    if isinstance(piece, BaseException):
                        raise StepFailed(position, piece)
                if all(p is None for p in pieces):
                    break
                if any(p is None for p in pieces):
                    raise StepFailed(pieces.index(None), serde.MalformedStream("update ended before the others"))
                await self._aggregate(rnd, reducer.add_step, pieces)
            reducer.finish()
        finally:
            await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
        for c, check in zip(done, checks):
            c.check = check
        return reducer.result

    # -- step 3: settle ----------------------------------------------------------------------------------------

    def _settle(
        self, rnd: _Round, clients: list[WorkerClient], outcomes: list[Contribution | BaseException]
    ) -> tuple[list[Contribution], bool]:
        """The workers that finished, and whether a failed one left part of its update in the sum."""
        done, tainted = [], False
        for client, outcome in zip(clients, outcomes):
            if isinstance(outcome, BaseException):
                tainted |= client.name in rnd.folding
                self._record_failure(rnd, _failure(client.name, outcome, self.round_timeout))
            else:
                done.append(outcome)
        return done, tainted

    def _drop(self, rnd: _Round, done: list[Contribution], c: Contribution, phase: str, cause: BaseException) -> None:
        done.remove(c)
        self._record_failure(rnd, _failure(c.client.name, _PhaseError(phase, cause), 0))

    def _record_failure(self, rnd: _Round, failure: Failure) -> None:
        rnd.report.failures.append(failure)
        log.warning("worker_dropped", worker=failure.worker, phase=failure.phase, reason=failure.reason)
        self.observer.worker_phase(failure.worker, "dropped", f"{failure.phase}: {failure.reason}")

    def _require_quorum(self, rnd: _Round, done: list[Contribution], clients: list[WorkerClient]) -> None:
        failures = rnd.report.failures
        if not self.strategy.accept([c.result for c in done], failures):
            reasons = "; ".join(f"{f.worker}: {f.reason}" for f in failures) or "no workers available"
            raise RoundFailed(
                f"round {rnd.number}: {len(done)} of {len(clients)} workers finished, below the quorum "
                f"(--min-workers) ({reasons}); the global model is unchanged",
                failures,
            )

    # -- step 4: install ---------------------------------------------------------------------------------------

    def _install(self, rnd: _Round, flat: list[torch.Tensor], scale: float = 1.0) -> None:
        """The aggregate, moved `scale` times from the global model (the strategy's say, e.g. FedNova's) and through
        the server optimizer, becomes the global model if it is finite."""
        if scale != 1.0:
            for g, a in zip(rnd.reference, flat):
                if a.is_floating_point():
                    a.sub_(g).mul_(scale).add_(g)
        self.server_optimizer.step(rnd.reference, flat)
        for meta, values in zip(rnd.payload.manifest, flat):
            # Finite in double precision is not enough: the model keeps its own dtype.
            if not (fits(values, meta.torch_dtype) if is_float(meta) else serde.all_finite(values)):
                raise RoundFailed(
                    f"round {rnd.number}: the aggregate of {meta.name} holds NaN or Inf; the global model is unchanged",
                    rnd.report.failures,
                )
        install(rnd.payload.manifest, flat, self.model.state_dict())

    # -- after install: federated evaluation ------------------------------------------------------------------

    async def _evaluate_federated(self, rnd: _Round, done: list[Contribution]) -> None:
        """Send the new global model to the round's workers and have each evaluate it on its local test split; the
        round reports the mean weighted by test samples. A worker that fails here keeps its update in the round."""
        payload = serde.WeightsPayload(
            self.model.state_dict(), round=rnd.number, architecture=self.architecture, round_id=f"{rnd.round_id}/eval"
        )
        sends = self._broadcasts(payload, [c.client for c in done])
        outcomes = await asyncio.gather(
            *(self._evaluate_on(payload, sends[c.client.name], c) for c in done), return_exceptions=True
        )
        for c, outcome in zip(done, outcomes):
            if isinstance(outcome, BaseException):
                log.warning("worker_evaluation_failed", worker=c.client.name, reason=str(outcome))
        evaluated = [c.stats for c in done if c.stats.eval_samples]
        total = sum(w.eval_samples for w in evaluated)
        if total:
            report = rnd.report
            report.federated_samples = total
            report.federated_loss = sum(w.eval_loss * w.eval_samples for w in evaluated) / total
            report.federated_accuracy = sum(w.eval_accuracy * w.eval_samples for w in evaluated) / total

    async def _evaluate_on(self, payload: serde.WeightsPayload, send: serde.Broadcast, c: Contribution) -> None:
        if c.client.info is not None:
            check_minimum(c.client.info.protocol_version, "1.3", "federated evaluation (--federated-evaluation)")
        await c.client.set_weights(send, payload.total_bytes)
        result = await c.client.evaluate(payload.round_id)
        if result.round_id != payload.round_id:
            raise WorkerRejected(c.client.name, f"Evaluate answered for round id {result.round_id!r}")
        c.stats.eval_loss, c.stats.eval_accuracy, c.stats.eval_samples = result.loss, result.accuracy, result.samples


async def _result(future: Future[T]) -> T:
    """A thread's result; the event loop waits for it only if it is not there yet."""
    return future.result() if future.done() else await asyncio.wrap_future(future)


def _work_asked(request: pb.TrainRequest) -> str:
    if request.local_batches:
        return f"{request.local_batches} batches"
    if request.local_seconds:
        return f"{request.local_seconds:g} seconds of batches of {request.batch_size}"
    return f"{request.local_epochs} epochs"


def _check_worker_supports(client: WorkerClient, request: pb.TrainRequest) -> None:
    """A field an older worker does not know would be ignored silently: refuse instead."""
    needs = [
        ("1.2", "FedProx (--proximal-mu)", request.proximal_mu),
        ("1.3", "a time budget (--local-seconds)", request.local_seconds),
    ]
    for minimum, feature, used in needs:
        if used and client.info is not None:
            try:
                check_minimum(client.info.protocol_version, minimum, feature)
            except ProtocolMismatch as exc:
                raise WorkerIncompatible(client.name, str(exc)) from None


def _check_update_header(header: pb.WeightsHeader, rnd: _Round) -> None:
    if header.round_id != rnd.round_id or not header.trained:
        # E.g. a worker restarted after Train, or another coordinator's weights: not this round's update.
        what = "trained update" if header.trained else "untrained weights"
        raise serde.MalformedStream(
            f"worker sent the {what} of round {header.round} (id {header.round_id!r}), "
            f"expected the trained update of round {rnd.number} (id {rnd.round_id!r})"
        )


def _failure(worker: str, exc: BaseException, round_timeout: float) -> Failure:
    if isinstance(exc, _PhaseError):
        return Failure(worker, exc.phase, str(exc.cause))
    if isinstance(exc, asyncio.TimeoutError):
        return Failure(worker, "round", f"did not finish within the round timeout of {round_timeout:.0f} s")
    return Failure(worker, "round", f"{type(exc).__name__}: {exc}")
