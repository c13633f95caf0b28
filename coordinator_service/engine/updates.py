"""Updates into aggregates: folding each update into a running sum as it streams in, walking all of them in step,
and what an aggregation rule is offered of a round (policy.rules.RoundUpdates). All arithmetic on weights runs on
one thread of its own: the event loop keeps moving bytes meanwhile, and folds into a shared sum never race."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import structlog
import torch

from coordinator_service.engine.aggregate import DeltaFold, NonFiniteAggregate, UpdateCheck, WeightedSum
from coordinator_service.engine.robust import CoordinateReducer, StepFailed
from coordinator_service.engine.state import Contribution, RoundFailed, RoundState
from coordinator_service.engine.transfer import Transfers
from coordinator_service.engine.worker_errors import WorkerError
from coordinator_service.policy.rules import Reduce, Update
from fedpi.runtime import elapsed
from fedpi.weights import serde

log = structlog.get_logger()

T = TypeVar("T")
# After a failed update stream the aggregate is rebuilt from the good workers; this bounds how often.
MAX_AGGREGATION_ATTEMPTS = 3
# Chunks of one update read ahead of the one being folded: the stream keeps moving while the weights thread works.
FOLD_AHEAD = 8


class WeightsThread:
    """The one thread that prepares, folds, reduces and averages weights."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fedpi-weights")

    async def run(self, work: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, work, *args)

    def soon(self, step: Callable, *args) -> Future[float]:
        """Queue one step now (steps run in the order queued); its result is the time it worked, which the round
        counts rather than the time several workers' chunks waited in the queue. A plain future: the event loop is
        woken for it only if something waits for it before it is done."""

        def timed() -> float:
            t = time.perf_counter()
            step(*args)
            return elapsed(t)

        return self._pool.submit(timed)


class Folder:
    """Streams updates into weighted sums (reusing last round's accumulators) and walks them in step."""

    def __init__(self, transfers: Transfers, thread: WeightsThread):
        self.transfers = transfers
        self.thread = thread
        self._accumulators: list[torch.Tensor] | None = None

    def new_sum(self, rnd: RoundState) -> WeightedSum:
        """A sum in last round's accumulators: the model they were installed into holds its own copy by now."""
        total = WeightedSum(rnd.payload.manifest, self._accumulators)
        self._accumulators = total.accumulators
        return total

    async def fold(self, rnd: RoundState, c: Contribution, total: WeightedSum) -> None:
        """Stream one worker's update straight into the running sum, chunk by chunk. The next chunks are read while
        earlier ones are folded, up to FOLD_AHEAD of them; once a chunk fails its check, no later one is folded."""
        fold = total.stream(c.weight, check(rnd))
        queued: deque[Future[float]] = deque()
        try:
            async for raw in self.transfers.update_pieces(rnd, c):
                queued.append(self.thread.soon(fold.add, raw))
                while queued and (len(queued) > FOLD_AHEAD or queued[0].done()):
                    rnd.aggregation_seconds += await result(queued.popleft())
        finally:  # a failed stream still waits for its queued folds: none may run after the round moves on
            outcomes = await asyncio.gather(*map(asyncio.wrap_future, queued), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            rnd.aggregation_seconds += outcome
        fold.finish()
        c.check = fold.check

    async def walk(self, rnd: RoundState, done: Sequence[Contribution], reduce: Reduce) -> list[torch.Tensor]:
        """`reduce` of every update, coordinate by coordinate, reading all their streams in step. StepFailed says
        whose stream broke the walk."""
        checks = [check(rnd) for _ in done]
        reducer = CoordinateReducer(rnd.payload.manifest, checks, reduce)
        streams = [self.transfers.update_pieces(rnd, c) for c in done]
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
                rnd.aggregation_seconds += await result(self.thread.soon(reducer.add_step, pieces))
            reducer.finish()
        finally:
            await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
        for c, measured in zip(done, checks):
            c.check = measured
        return reducer.result


class ArrivedUpdates:
    """One round's updates, as its aggregation rule sees them (policy.rules.RoundUpdates). A worker whose update
    breaks on a second reading is dropped through `drop`, which records why."""

    def __init__(self, folder: Folder, rnd: RoundState, done: list[Contribution], total: WeightedSum | None,
                 drop: Callable[[Contribution, BaseException], None]):  # fmt: skip
        self.folder, self.rnd, self.done, self.total, self._drop = folder, rnd, done, total, drop

    @property
    def number(self) -> int:
        return self.rnd.number

    @property
    def arrived(self) -> Sequence[Contribution]:
        return tuple(self.done)

    @property
    def reference(self) -> Sequence[torch.Tensor]:
        return self.rnd.reference

    def failed(self, message: str) -> RoundFailed:
        return RoundFailed(f"round {self.rnd.number}: {message}", self.rnd.report.failures)

    def drop(self, c: Contribution, cause: BaseException) -> None:
        self.done.remove(c)
        self._drop(c, cause)

    async def refold(self) -> None:
        """Rebuild the sum from the workers whose updates are still good (a failed worker left part of its update
        in it); drop any that fail again."""
        for attempt in range(MAX_AGGREGATION_ATTEMPTS):
            log.warning("aggregation_restarted", attempt=attempt + 1, workers=[c.name for c in self.done])
            total = self.folder.new_sum(self.rnd)
            outcomes = await asyncio.gather(
                *(self.folder.fold(self.rnd, c, total) for c in self.done), return_exceptions=True
            )
            failed = [(c, o) for c, o in zip(self.done, outcomes) if isinstance(o, BaseException)]
            for c, outcome in failed:
                self.drop(c, outcome)
            if not failed:
                self.total = total
                return
        raise self.failed("worker updates kept failing to arrive intact")

    async def mean(self) -> list[torch.Tensor]:
        total = self._sum("mean")
        try:
            return await self.folder.thread.run(total.mean)
        except NonFiniteAggregate as exc:
            raise self.failed(str(exc)) from None

    async def add_scaled(self, update: Update, weight: float) -> None:
        if not isinstance(update, Contribution):
            raise TypeError(f"add_scaled takes one of this round's updates, not {update!r}")
        fold = DeltaFold(self._sum("add_scaled"), weight, check(self.rnd), self.rnd.reference)
        try:
            async for raw in self.folder.transfers.update_pieces(self.rnd, update):
                await self.folder.thread.run(fold.add, raw)
            fold.finish()
        except (WorkerError, serde.WeightsError) as exc:
            # Part of the correction is in the sum: what is there now is no longer any worker's update.
            raise self.failed(f"{update.name}'s update could not be fetched again ({exc})") from exc

    async def walk(self, reduce_for: Callable[[int], Reduce]) -> list[torch.Tensor]:
        for attempt in range(MAX_AGGREGATION_ATTEMPTS + 1):
            try:
                reduce = reduce_for(len(self.done))
            except ValueError as exc:  # too few updates left for the rule
                raise self.failed(str(exc)) from None
            try:
                return await self.folder.walk(self.rnd, self.done, reduce)
            except StepFailed as exc:
                self.drop(self.done[exc.position], exc.cause)
            log.warning("aggregation_restarted", attempt=attempt + 1, workers=[c.name for c in self.done])
        raise self.failed("worker updates kept failing to arrive intact")

    def _sum(self, what: str) -> WeightedSum:
        if self.total is None:
            raise TypeError(f"{what} needs a streaming rule: the updates of this round were not summed")
        return self.total


def check(rnd: RoundState) -> UpdateCheck:
    """A fresh measurement of one update against the round's global model."""
    return UpdateCheck(rnd.payload.manifest, rnd.reference, rnd.max_distance)


async def result(future: Future[T]) -> T:
    """A thread's result; the event loop waits for it only if it is not there yet."""
    return future.result() if future.done() else await asyncio.wrap_future(future)
