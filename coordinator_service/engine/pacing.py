"""What a board's health changes about the work it is given (protocol 1.10, BoardHealth).

- A board that says it is throttled now (by heat or by its supply) and trains slower than it did unthrottled gets
  fewer batches, in proportion: it then takes about as long as it did at full speed, and no other board waits for
  it. Time budgets (--local-seconds) follow throughput already and are left alone.
- A board that reports less free memory than taking the next model needs is skipped for the round, with the reason,
  and asked again the next round.

Both read only what the boards report of themselves: a laptop that reports nothing is never paced or skipped."""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from coordinator_service.policy.strategy import Failure
from generated.fedpi.v1 import worker_pb2 as pb

log = structlog.get_logger()

# Taking a model needs its size free (the worker stages a SetWeights whole before it installs it) plus room for the
# batches, the gradients' allocator slack and the interpreter; 64 MiB covers the reference CNN's training step.
MEMORY_MARGIN_BYTES = 64 << 20
SKIPPED = "short of memory"  # the phase a skipped worker is reported under, beside "refused" and "unavailable"


@dataclass
class Board:
    health: pb.BoardHealth | None = None  # as last reported: GetInfo, then every Train progress
    best_samples_per_second: float = 0.0  # over rounds it trained unthrottled
    last_samples_per_second: float = 0.0  # its last round


def _throttled(health: pb.BoardHealth | None) -> bool:
    return health is not None and (health.throttled or health.under_voltage or health.frequency_capped)


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.0f} MiB"


class Pacer:
    def __init__(self) -> None:
        self._boards: dict[str, Board] = {}

    def _board(self, worker: str) -> Board:
        return self._boards.setdefault(worker, Board())

    def saw(self, worker: str, health: pb.BoardHealth) -> None:
        self._board(worker).health = health

    def trained(self, worker: str, result: pb.TrainResult, troubled: bool) -> None:
        """A round's throughput; one trained while throttled or under-volted never counts as the board's best."""
        if result.train_seconds <= 0 or result.samples <= 0:
            return
        board = self._board(worker)
        board.last_samples_per_second = result.samples / result.train_seconds
        if not troubled:
            board.best_samples_per_second = max(board.best_samples_per_second, board.last_samples_per_second)

    def short_of_memory(
        self, worker: str, info: pb.WorkerInfo | None, model_bytes: int, quiet: bool = False
    ) -> Failure | None:
        """Why `worker` sits this round out, or None. Its handshake's health counts until it reports another."""
        board = self._board(worker)
        health = board.health or (info.health if info is not None and info.HasField("health") else None)
        if health is None or not health.HasField("memory_available_bytes"):
            return None
        need = model_bytes + MEMORY_MARGIN_BYTES
        if health.memory_available_bytes >= need:
            return None
        reason = (
            f"its board reports {_mib(health.memory_available_bytes)} of memory available; taking the model "
            f"({_mib(model_bytes)}) needs at least {_mib(need)}. Skipped this round, asked again the next"
        )
        if not quiet:
            log.warning("worker_skipped", worker=worker, phase=SKIPPED, reason=reason)
        return Failure(worker, SKIPPED, reason)

    def pace(self, worker: str, request: pb.TrainRequest, shard: int) -> None:
        """Fewer batches in `request` for a board throttled now that trained slower than its best."""
        board = self._board(worker)
        if request.local_seconds or not _throttled(board.health):
            return
        best, last = board.best_samples_per_second, board.last_samples_per_second
        if not 0 < last < best:
            return
        asked = request.local_batches or request.local_epochs * -(-shard // max(request.batch_size, 1))
        batches = max(1, int(asked * last / best))
        if batches >= asked:
            return
        request.local_batches, request.local_epochs = batches, 0
        log.warning(
            "worker_work_reduced",
            worker=worker,
            batches=batches,
            asked=asked,
            reason=f"its board is throttled and trains {last:.0f} samples/s against {best:.0f} unthrottled",
        )
