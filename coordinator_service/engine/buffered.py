"""Buffered asynchronous federated learning (`--mode async`): no worker waits for another.

FedBuff (Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation", AISTATS 2022). Server version v
is the global model after v server steps. Every worker trains, all the time, from the newest version it was sent.
Its update, d = y - x_v, weighs w (its samples, as in FedAvg; 1 with --unweighted) times s(tau) = (1 + tau)^-a, tau
being the versions applied since x_v (its staleness) and a the --staleness-exponent (FedBuff's 1/sqrt(1 + tau) at
0.5). It is folded into the buffer as it streams in. Once --buffer-size updates are in, the buffer's
sum(s_i w_i d_i) / sum(w_i) is the server step, through the server optimizer: x_{v+1}. A worker whose update is in
gets the newest version at once. An update more than --max-staleness versions old is refused unfetched, and its
worker gets the newest version.

Everything a synchronous round checks holds for each update: round id, manifest, digest, finiteness, the sample
bound, and the distance bound against the version it was trained from. Each version therefore stays in memory while
a worker trains from it: at most one per worker besides the newest.

Memory: the global model, the buffer, one scratch sum and those versions; never an update whole. An update is folded
into the scratch and added to the buffer once it has arrived whole and passed every check, so one that breaks or is
refused mid-stream leaves nothing behind; updates are therefore folded one at a time (the others' workers wait for
their turn to upload, which the idle fraction shows).

The rest of fedpi sees a version as a round: each version's report is evaluated, checkpointed (a resumed run goes on
from the last checkpointed version), logged as `round_finished` (with `version`) and drawn by the report."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import structlog
import torch

from coordinator_service.engine.aggregate import DeltaFold, WeightedSum, is_float
from coordinator_service.engine.roster import Roster
from coordinator_service.engine.rounds import RoundRunner, install_aggregate
from coordinator_service.engine.state import Contribution, PhaseError, RoundFailed, RoundReport, RoundState, failure
from coordinator_service.engine.updates import check
from coordinator_service.engine.worker_client import WorkerClient
from coordinator_service.engine.worker_errors import WorkerError
from coordinator_service.policy.strategy import Failure
from fedpi.runtime import elapsed
from fedpi.weights import serde

log = structlog.get_logger()

STALE = "stale"  # the phase a refused stale update is reported under
MAX_WAITING_VERSIONS = 2  # made, and not yet handed to evaluation and checkpointing


@dataclass(frozen=True)
class AsyncSettings:
    buffer_size: int = 2  # K: updates per server step
    max_staleness: int = 10  # versions; an update older than this is refused
    staleness_exponent: float = 0.5  # a in s(tau) = (1 + tau)^-a

    def staleness_weight(self, staleness: int) -> float:
        return float((1 + staleness) ** -self.staleness_exponent)


@dataclass
class Version:
    """A global model some worker trains from: its payload and a frozen copy of its weights."""

    number: int
    rnd: RoundState
    model: torch.nn.Module  # the weights rnd's payload and reference read from, never changed
    training: int = 0  # workers training from it now


@dataclass
class Buffer:
    total: WeightedSum
    members: list[Contribution] = field(default_factory=list)
    weight: float = 0.0  # sum of the members' FedAvg weights, without their staleness
    failures: list[Failure] = field(default_factory=list)  # since the last step
    aggregation_seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)


@dataclass
class Busy:
    """How much of its time each worker spends training (or moving its weights) rather than waiting."""

    since: float = field(default_factory=time.monotonic)
    until: float | None = None  # the run's last version was made: the clock stops
    working: dict[str, float] = field(default_factory=dict)  # finished spans of work
    started: dict[str, float] = field(default_factory=dict)  # the span each worker is in now

    def _clock(self) -> float:
        return min(time.monotonic(), self.until or math.inf)

    @contextlib.contextmanager
    def span(self, worker: str) -> Iterator[None]:
        self.started[worker] = time.monotonic()
        try:
            yield
        finally:
            start = self.started.pop(worker)
            self.working[worker] = self.working.get(worker, 0.0) + max(0.0, self._clock() - start)

    def idle_fractions(self) -> dict[str, float]:
        now = self._clock()
        wall = max(now - self.since, 1e-9)
        busy = {w: s + max(0.0, now - self.started[w]) if w in self.started else s for w, s in self.working.items()}
        busy |= {w: max(0.0, now - t) for w, t in self.started.items() if w not in busy}
        return {w: round(max(0.0, 1 - s / wall), 4) for w, s in busy.items()}


class BufferedRunner:
    """Runs server versions first_version + 1 .. last on every worker the roster admits, each worker on its own."""

    def __init__(
        self,
        runner: RoundRunner,
        roster: Roster,
        settings: AsyncSettings,
        on_version: Callable[[RoundReport, torch.nn.Module], Awaitable[None]],
        *,
        stall_timeout: float,
        retry_backoff: float,
        stop: asyncio.Event | None = None,
    ):
        self.runner = runner
        self.roster = roster
        self.settings = settings
        self.on_version = on_version
        self.stall_timeout = stall_timeout
        self.retry_backoff = retry_backoff
        self.stop = stop
        self.busy = Busy()
        self._versions: dict[int, Version] = {}
        self._version = 0
        self._buffer: Buffer | None = None
        self._scratch: WeightedSum | None = None
        self._fold_lock = asyncio.Lock()
        self._advanced = asyncio.Event()
        self._last: int = 0
        self._dispatches: dict[tuple[str, int], int] = {}
        self._workers: dict[str, asyncio.Task] = {}
        self._admitting: asyncio.Task | None = None
        self._fatal: BaseException | None = None  # what ends the run from inside a server step
        # Versions made and not yet handed on, with their frozen models: handed on by the run's own task, which the
        # end of the run does not cancel half-way as it does the workers'.
        self._made: deque[tuple[RoundReport, torch.nn.Module]] = deque()
        # At most this many wait: a coordinator whose evaluation falls behind makes versions no faster than it
        # evaluates them, rather than hold ever more models.
        self._room = asyncio.Semaphore(MAX_WAITING_VERSIONS)

    @property
    def version(self) -> int:
        return self._version

    # -- the run ---------------------------------------------------------------------------------------------

    async def run(self, first_version: int, last: int) -> int:
        """Versions until `last`, or until `stop` is set after a version; returns the last version made."""
        self._version, self._last = first_version, last
        self.busy = Busy()
        self._new_version()
        self._buffer = self._new_buffer()
        try:
            while self._version < last and not (self.stop is not None and self.stop.is_set()):
                self._admit_soon()
                try:
                    if not self._made:
                        self._advanced.clear()
                        await asyncio.wait_for(self._advanced.wait(), self.stall_timeout)
                except TimeoutError:
                    reasons = "; ".join(f"{f.worker}: {f.reason}" for f in self._buffer.failures + self.roster.away)
                    raise RoundFailed(
                        f"version {self._version + 1}: no server step within {self.stall_timeout:.0f} s "
                        f"(--round-timeout): {len(self._buffer.members)} of {self.settings.buffer_size} updates "
                        f"in the buffer ({reasons or 'no worker failed'})",
                        self._buffer.failures,
                    ) from None
                if self._fatal is not None:
                    raise self._fatal
                await self._hand_on(1)  # one at a time: a stop asked for meanwhile ends the run at the next version
        finally:
            self.busy.until = self.busy.until or time.monotonic()
            tasks = [*self._workers.values(), *([self._admitting] if self._admitting else [])]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._hand_on()
        return self._version

    async def _hand_on(self, most: int | None = None) -> None:
        """Finish the versions made so far (at most `most` of them), oldest first."""
        for _ in range(len(self._made) if most is None else min(most, len(self._made))):
            await self.on_version(*self._made.popleft())
            self._room.release()

    def _admit_soon(self) -> None:
        """Handshake absent workers (absent at the start, refused then, or come back) beside the run, one admission at
        a time: a worker that does not answer costs the others nothing."""
        if self._admitting is None or self._admitting.done():
            self._admitting = asyncio.create_task(self._admit())

    async def _admit(self) -> None:
        await self.roster.admit()
        self._start_workers()

    def _start_workers(self) -> None:
        for client in self.roster.active:
            running = self._workers.get(client.name)
            if running is None or running.done():
                self._workers[client.name] = asyncio.create_task(self._serve(client))

    # -- one worker, forever ---------------------------------------------------------------------------------

    async def _serve(self, client: WorkerClient) -> None:
        structlog.contextvars.bind_contextvars(worker=client.name)
        while self._version < self._last:
            try:
                await asyncio.wait_for(self._once(client), self.runner.round_timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a worker's failure is recorded, never the run's
                self._fail(failure(client.name, exc, self.runner.round_timeout))
                await self._rejoin(client)

    async def _once(self, client: WorkerClient) -> None:
        version = self._versions[self._version]
        version.training += 1
        structlog.contextvars.bind_contextvars(version=version.number)  # this worker's events name what it trains from
        try:
            with self.busy.span(client.name):
                contribution = await self._train(version, client)
            await self._fold(version, contribution)
        finally:
            version.training -= 1
            self._forget_old_versions()

    async def _train(self, version: Version, client: WorkerClient) -> Contribution:
        rnd = version.rnd
        rnd.sends[client.name] = self.runner.transfers.broadcasts(rnd.payload, [client])[client.name]
        key = (client.name, version.number)
        self._dispatches[key] = self._dispatches.get(key, 0) + 1
        return await self.runner.train_one(rnd, client, self.roster.index(client), repeat=self._dispatches[key] - 1)

    async def _rejoin(self, client: WorkerClient) -> None:
        """After a failure: wait, then handshake again until the worker answers (a restarted process)."""
        backoff = self.retry_backoff
        while self._version < self._last:
            await asyncio.sleep(backoff)
            try:
                await asyncio.wait_for(client.handshake(self.roster.expected), self.roster.handshake_timeout)
                log.info("worker_rejoined", worker=client.name, version=self._version)
                return
            except (WorkerError, TimeoutError):
                backoff = min(backoff * 2, 60.0)

    def _refuse_stale(self, client: WorkerClient, version: Version, staleness: int) -> None:
        reason = (
            f"its update was trained from version {version.number}, {staleness} versions old, beyond "
            f"--max-staleness {self.settings.max_staleness}; refused unfetched, and it gets the newest version"
        )
        self._fail(Failure(client.name, STALE, reason))

    def _fail(self, f: Failure) -> None:
        assert self._buffer is not None
        self._buffer.failures.append(f)
        log.warning("worker_dropped", worker=f.worker, phase=f.phase, reason=f.reason, version=self._version)
        self.runner.observer.worker_phase(f.worker, "dropped", f"{f.phase}: {f.reason}")

    # -- the buffer --------------------------------------------------------------------------------------------

    async def _fold(self, version: Version, c: Contribution) -> None:
        """Stream the update into the scratch sum, then add it to the buffer; a full buffer becomes a version.
        Waiting for its turn is idle time; folding is not."""
        async with self._fold_lock:
            with self.busy.span(c.name):
                await self._fold_now(version, c)

    async def _fold_now(self, version: Version, c: Contribution) -> None:
        if self._version >= self._last:
            return  # the run has made its last version while this update waited
        staleness = self._version - version.number  # counted once its turn has come
        c.stats.staleness = staleness
        if staleness > self.settings.max_staleness:
            return self._refuse_stale(c.client, version, staleness)
        weight = c.weight * self.settings.staleness_weight(staleness)
        scratch = self._scratch_sum(version.rnd)
        fold = DeltaFold(scratch, weight, check(version.rnd), version.rnd.reference)
        self.runner.observer.worker_phase(c.name, "receiving")
        t = time.perf_counter()
        try:
            async for raw in self.runner.transfers.update_pieces(version.rnd, c):
                await self.runner.weights_thread.run(fold.add, raw)
            fold.finish()
        except (WorkerError, serde.WeightsError) as exc:
            raise PhaseError("get_weights", exc) from exc
        buffer = self._buffer
        assert buffer is not None
        await self.runner.weights_thread.run(_add_into, buffer.total, scratch)
        c.stats.update_distance = fold.check.distance
        buffer.members.append(c)
        buffer.weight += c.weight
        buffer.aggregation_seconds += elapsed(t)
        self.runner.observer.worker_phase(c.name, "done")
        log.info(
            "update_buffered",
            worker=c.name,
            trained_from=version.number,
            staleness=staleness,
            weight=round(weight, 4),
            buffered=len(buffer.members),
            buffer_size=self.settings.buffer_size,
        )
        if len(buffer.members) >= self.settings.buffer_size:
            try:
                await self._step(buffer)
            except Exception as exc:  # noqa: BLE001 - the run's failure, not this worker's
                self._fatal = exc
                self._advanced.set()

    async def _step(self, buffer: Buffer) -> None:
        """x_{v+1} = the server optimizer's step from x_v towards x_v + sum(s_i w_i d_i) / sum(w_i)."""
        # Room first: from here on a version is either made and handed on whole, or (cancelled) not made at all.
        await self._room.acquire()
        try:
            current = self._versions[self._version]
            t = time.perf_counter()
            number = self._version + 1
            target = await self.runner.weights_thread.run(_target, current.rnd, buffer)
            await self.runner.weights_thread.run(
                install_aggregate, self.runner.model, self.runner.server_optimizer, current.rnd, target, 1.0
            )
        except BaseException:
            self._room.release()
            raise
        report = RoundReport(number, workers=[c.stats for c in buffer.members], failures=buffer.failures)
        report.version = number
        report.aggregation = f"fedbuff (buffer {self.settings.buffer_size})"
        report.aggregation_seconds = buffer.aggregation_seconds + elapsed(t)
        report.max_update_distance = current.rnd.max_distance
        report.wall_seconds = elapsed(buffer.started)
        report.absent = list(self.roster.away)
        report.idle_fraction = self.busy.idle_fractions()
        self._version = number
        if number >= self._last:
            self.busy.until = time.monotonic()
        self._new_version()
        self._buffer = self._new_buffer(reuse=buffer.total)
        self._forget_old_versions()
        self._made.append((report, self._versions[number].model))
        self._advanced.set()

    def _new_version(self) -> None:
        """Freeze the live model as the newest version (its payload is what the next workers are sent)."""
        frozen = copy.deepcopy(self.runner.model)
        rnd = RoundState.begin(
            frozen,
            self.runner.architecture,
            f"{self.runner.run_id}/v{self._version}",
            self._version + 1,
            self.runner.max_update_ratio,
        )
        rnd.sent.set()
        self._versions[self._version] = Version(self._version, rnd, frozen)

    def _forget_old_versions(self) -> None:
        for number in [n for n, v in self._versions.items() if n != self._version and v.training == 0]:
            del self._versions[number]
        self._dispatches = {k: n for k, n in self._dispatches.items() if k[1] in self._versions}

    def _new_buffer(self, reuse: WeightedSum | None = None) -> Buffer:
        manifest = self._versions[self._version].rnd.payload.manifest
        return Buffer(WeightedSum(manifest, reuse.accumulators if reuse is not None else None))

    def _scratch_sum(self, rnd: RoundState) -> WeightedSum:
        reuse = self._scratch.accumulators if self._scratch is not None else None
        self._scratch = WeightedSum(rnd.payload.manifest, reuse)
        return self._scratch


def _add_into(total: WeightedSum, part: WeightedSum) -> None:
    for acc, more in zip(total.accumulators, part.accumulators):
        acc.add_(more)


def _target(current: RoundState, buffer: Buffer) -> list[torch.Tensor]:
    """x_v + the buffer's mean step, flat, in the accumulators' dtype (its own accumulators, reused in place);
    integer buffers (a BatchNorm's counter) stay as they are in x_v."""
    out = buffer.total.accumulators
    for meta, acc, ref in zip(current.payload.manifest, out, current.reference):
        if is_float(meta):
            acc.div_(buffer.weight).add_(ref.to(acc.dtype))
        else:
            acc.copy_(ref.to(acc.dtype))
    return out
