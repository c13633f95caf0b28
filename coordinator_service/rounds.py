"""The round loop: every worker concurrently receives the global model, trains, and streams its update back into
one running FedAvg sum. Failures are collected per worker and handed to the strategy; they never hang a round."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import structlog
import torch

from coordinator_service.aggregate import WeightedSum
from coordinator_service.strategy import Failure, Strategy
from coordinator_service.worker_client import WorkerClient, WorkerError, elapsed
from fedpi import serde
from fedpi.data import Split
from fedpi.models import evaluate
from generated.fedpi.v1 import worker_pb2 as pb

log = structlog.get_logger()

# After a failed update stream the sum is rebuilt from the good workers; this bounds how often.
MAX_AGGREGATION_ATTEMPTS = 3


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
    test_loss: float = 0.0
    test_accuracy: float = 0.0
    aggregation_seconds: float = 0.0
    wall_seconds: float = 0.0

    @property
    def overhead_seconds(self) -> float:
        """Round wall time beyond the slowest worker's pure training."""
        return self.wall_seconds - max((w.train_seconds for w in self.workers), default=0.0)

    def as_event(self) -> dict:
        return {
            "round": self.round,
            "test_accuracy": round(self.test_accuracy, 4),
            "test_loss": round(self.test_loss, 4),
            "wall_seconds": round(self.wall_seconds, 3),
            "overhead_seconds": round(self.overhead_seconds, 3),
            "aggregation_seconds": round(self.aggregation_seconds, 3),
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
        }


@dataclass(frozen=True)
class TransferSettings:
    chunk_size: int = serde.DEFAULT_CHUNK_BYTES
    encoding: int = pb.CHUNK_ENCODING_RAW


class _PhaseError(Exception):
    def __init__(self, phase: str, cause: BaseException):
        super().__init__(str(cause))
        self.phase = phase
        self.cause = cause


class RoundRunner:
    """Runs rounds against one global model, each with the workers present at its start."""

    def __init__(self, *, model: torch.nn.Module, architecture: str, strategy: Strategy, test_split: Split | None,
                 transfer: TransferSettings = TransferSettings(), round_timeout: float = 3600.0):
        self.model = model
        self.architecture = architecture
        self.strategy = strategy
        self.test_split = test_split
        self.transfer = transfer
        self.round_timeout = round_timeout

    async def run_round(self, server_round: int, clients: Sequence[WorkerClient],
                        index_of: Callable[[WorkerClient], int] | None = None) -> RoundReport:
        """One round. `index_of` gives each worker a stable number for its seed (default: its position)."""
        clients = list(clients)
        structlog.contextvars.bind_contextvars(round=server_round)
        try:
            return await self._run_round(server_round, clients, index_of or clients.index)
        finally:
            structlog.contextvars.unbind_contextvars("round")

    async def _run_round(self, server_round: int, clients: list[WorkerClient],
                         index_of: Callable[[WorkerClient], int]) -> RoundReport:
        start = time.perf_counter()
        log.info("round_started", workers=[c.name for c in clients])
        report = RoundReport(server_round)
        payload = serde.WeightsPayload(self.model.state_dict(), round=server_round, architecture=self.architecture)
        total = WeightedSum(payload.manifest)
        agg_seconds = [0.0]
        folding: set[str] = set()  # workers whose update has started to enter the sum

        async def one(index: int, client: WorkerClient) -> tuple[WorkerRound, pb.TrainResult]:
            stats = WorkerRound(client.name)
            t = time.perf_counter()
            try:
                await client.set_weights(payload, self.transfer.chunk_size, self.transfer.encoding)
            except WorkerError as exc:
                raise _PhaseError("set_weights", exc) from exc
            stats.bytes_sent, stats.send_seconds = payload.total_bytes, elapsed(t)
            try:
                result = await client.train(self.strategy.configure_train(server_round, index))
            except WorkerError as exc:
                raise _PhaseError("train", exc) from exc
            stats.samples, stats.train_seconds = result.samples, result.train_seconds
            stats.train_loss, stats.train_accuracy = result.mean_loss, result.accuracy
            log.info("worker_train_finished", worker=client.name, samples=result.samples,
                     seconds=round(result.train_seconds, 3), loss=round(result.mean_loss, 4))
            folding.add(client.name)
            try:
                await self._fold(client, payload, total, self.strategy.weight(result), stats, agg_seconds)
            except (WorkerError, serde.WeightsError) as exc:
                raise _PhaseError("get_weights", exc) from exc
            return stats, result

        outcomes = await asyncio.gather(
            *(asyncio.wait_for(one(index_of(c), c), self.round_timeout) for c in clients),
            return_exceptions=True,
        )
        done: list[tuple[WorkerClient, WorkerRound, pb.TrainResult]] = []
        tainted = False  # a stream that failed part-way (error or timeout) may have left part of itself in the sum
        for client, outcome in zip(clients, outcomes):
            if isinstance(outcome, BaseException):
                failure = _failure(client.name, outcome, self.round_timeout)
                tainted |= client.name in folding
                report.failures.append(failure)
                log.warning("worker_dropped", worker=client.name, phase=failure.phase, reason=failure.reason)
            else:
                done.append((client, *outcome))

        for attempt in range(MAX_AGGREGATION_ATTEMPTS):
            if not tainted:
                break
            log.warning("aggregation_restarted", attempt=attempt + 1, workers=[c.name for c, _, _ in done])
            total, tainted = await self._refold(payload, done, report, agg_seconds)
        if tainted:
            raise RoundFailed(f"round {server_round}: worker updates kept failing to arrive intact", report.failures)

        results = [r for _, _, r in done]
        if not self.strategy.accept(results, report.failures):
            reasons = "; ".join(f"{f.worker}: {f.reason}" for f in report.failures) or "no workers available"
            raise RoundFailed(
                f"round {server_round}: {len(results)} of {len(clients)} workers finished, below the quorum "
                f"(--min-workers) ({reasons}); the global model is unchanged", report.failures)
        report.workers = [s for _, s, _ in done]
        t = time.perf_counter()
        total.mean_into(self.model.state_dict())
        report.aggregation_seconds = agg_seconds[0] + elapsed(t)
        log.debug("weights_aggregated", contributors=total.contributors, total_weight=total.total_weight)
        if self.test_split is not None:
            report.test_loss, report.test_accuracy = await asyncio.to_thread(evaluate, self.model, self.test_split)
        report.wall_seconds = elapsed(start)
        return report

    async def _fold(self, client: WorkerClient, payload: serde.WeightsPayload, total: WeightedSum, weight: float,
                    stats: WorkerRound, agg_seconds: list[float]) -> None:
        """Stream one worker's update straight into the running sum, chunk by chunk."""
        t = time.perf_counter()
        reader = serde.StreamReader(architecture=self.architecture, expected=payload.manifest,
                                    max_payload_bytes=max(payload.total_bytes, 1))
        fold = total.stream(weight)
        async for chunk in client.get_weights(self.transfer.chunk_size, self.transfer.encoding, payload.total_bytes):
            raw = reader.accept(chunk)
            if raw is None and reader.header.round != payload.round:
                # E.g. a worker restarted after Train: its weights are not this round's update.
                raise serde.MalformedStream(f"worker sent weights of round {reader.header.round}, "
                                            f"expected round {payload.round}")
            if raw is not None:
                f = time.perf_counter()
                fold.add(raw)
                agg_seconds[0] += elapsed(f)
        reader.finish()
        fold.finish()
        stats.bytes_received, stats.receive_seconds = reader.received, elapsed(t)

    async def _refold(self, payload, done, report, agg_seconds) -> tuple[WeightedSum, bool]:
        """Rebuild the sum from the workers whose updates are still good; drop any that fail again."""
        total = WeightedSum(payload.manifest)
        outcomes = await asyncio.gather(
            *(self._fold(c, payload, total, self.strategy.weight(r), s, agg_seconds) for c, s, r in done),
            return_exceptions=True,
        )
        tainted = False
        for (client, _, _), outcome in zip(list(done), outcomes):
            if isinstance(outcome, BaseException):
                tainted = True
                done[:] = [d for d in done if d[0] is not client]
                report.failures.append(_failure(client.name, _PhaseError("get_weights", outcome), 0))
        return total, tainted


def _failure(worker: str, exc: BaseException, round_timeout: float) -> Failure:
    if isinstance(exc, _PhaseError):
        return Failure(worker, exc.phase, str(exc.cause))
    if isinstance(exc, asyncio.TimeoutError):
        return Failure(worker, "round", f"did not finish within the round timeout of {round_timeout:.0f} s")
    return Failure(worker, "round", f"{type(exc).__name__}: {exc}")
