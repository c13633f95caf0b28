"""The round loop: every worker concurrently receives the global model, trains, and streams its update back.
Failures are collected per worker and handed to the strategy; they never hang a round.

A round has three steps, each a method below, and never names an aggregation rule: train (send the model, train,
check the result; for a streaming rule, fold the update into the sum as soon as its worker is done), settle (who
failed, and does anything of theirs sit in the sum), then the rule combines what arrived (policy.rules) and the
aggregate replaces the global model only if it is finite (install)."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Callable, Sequence
from functools import partial

import structlog
import torch

from coordinator_service.engine.aggregate import WeightedSum, distance, fits, install, is_float
from coordinator_service.engine.evaluation import evaluate_federated
from coordinator_service.engine.observer import RunObserver
from coordinator_service.engine.pacing import Pacer
from coordinator_service.engine.secure import PHASE, SecureRound, SecureSettings
from coordinator_service.engine.state import (
    Contribution,
    PhaseError,
    RoundFailed,
    RoundReport,
    RoundState,
    TransferSettings,
    WorkerRound,
    failure,
)
from coordinator_service.engine.transfer import Transfers
from coordinator_service.engine.updates import ArrivedUpdates, Folder, WeightsThread
from coordinator_service.engine.worker_client import WorkerClient, offered, speaks
from coordinator_service.engine.worker_errors import WorkerError, WorkerIncompatible, WorkerRejected
from coordinator_service.policy.privacy import GaussianMean
from coordinator_service.policy.rules import AggregationRule, WeightedMean
from coordinator_service.policy.server_opt import AUTO_AGREEMENT, ServerOptimizer, update_agreement
from coordinator_service.policy.strategy import Failure, Strategy
from fedpi.net.protocol import ProtocolMismatch, check_minimum
from fedpi.runtime import elapsed
from fedpi.weights import serde
from generated.fedpi.v1 import worker_pb2 as pb

log = structlog.get_logger()

__all__ = ["DEFAULT_MAX_UPDATE_RATIO", "RoundFailed", "RoundReport", "RoundRunner", "TransferSettings", "WorkerRound"]

# An update further than this many times the global model's norm (L2, at least 1) from the global model it was
# trained from is refused. Honest local training moves a model by a small fraction of its norm per round (docs/guide.md,
# Robust aggregation); a factor of 10 leaves room for high learning rates and catches overflow-sized values.
DEFAULT_MAX_UPDATE_RATIO = 10.0
HEALTH_TIMEOUT = 10.0  # seconds for a GetInfo asking a board short of memory whether it still is


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
        aggregation: AggregationRule = WeightedMean(),
        max_update_ratio: float = DEFAULT_MAX_UPDATE_RATIO,
        run_id: str | None = None,
        server_optimizer: ServerOptimizer | None = None,
        federated_evaluation: bool = False,
        observer: RunObserver | None = None,
        secure: SecureSettings | None = None,
    ):
        self.model = model
        self.architecture = architecture
        self.strategy = strategy
        self.transfers = Transfers(transfer, architecture)
        self.round_timeout = round_timeout
        self.aggregation = aggregation
        self.max_update_ratio = max_update_ratio
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.server_optimizer = server_optimizer or ServerOptimizer()
        self.federated_evaluation = federated_evaluation
        self.secure = secure  # secure aggregation: masked updates, summed and unmasked (engine.secure)
        self.observer = observer or RunObserver()
        self._attempts = 0  # every call gets its own round id, so a retried round never mixes with its first try
        self.weights_thread = WeightsThread()
        self._folder = Folder(self.transfers, self.weights_thread)
        self.pacer = Pacer()  # what each board's health changes about its work

    @property
    def transfer(self) -> TransferSettings:
        return self.transfers.settings

    async def run_round(
        self, server_round: int, clients: Sequence[WorkerClient], index_of: Callable[[WorkerClient], int] | None = None
    ) -> RoundReport:
        """One round. `index_of` gives each worker a stable number for its seed (default: its position)."""
        clients = list(clients)
        index_of = index_of or clients.index
        structlog.contextvars.bind_contextvars(round=server_round)
        try:
            skipped = await self._short_of_memory(clients)
            able = [c for c in clients if c.name not in {f.worker for f in skipped}]
            return await self._run_round(
                server_round, self.strategy.sample(server_round, able, index_of), index_of, len(clients), skipped
            )
        finally:
            structlog.contextvars.unbind_contextvars("round")

    async def _short_of_memory(self, clients: list[WorkerClient]) -> list[Failure]:
        """The workers whose boards said they lack the memory to take the model; each is asked again first (a
        skipped board sends no progress, so only GetInfo can say it has recovered)."""
        model_bytes = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        short = [c for c in clients if self.pacer.short_of_memory(c.name, c.info, model_bytes, quiet=True)]
        for client in short:
            try:
                self.pacer.saw(client.name, (await asyncio.wait_for(client.get_info(), HEALTH_TIMEOUT)).health)
            except (TimeoutError, WorkerError):
                pass  # the round's own calls will say what is wrong with it
        return [f for c in short if (f := self.pacer.short_of_memory(c.name, c.info, model_bytes)) is not None]

    async def _announce(self, rnd: RoundState, clients: list[WorkerClient], present: int) -> None:
        """Log round_started with the model's sha256 digest, hashed on the weights thread once the model is out and
        the workers train: beside the sends it would slow them (workers check the digest their stream carries, not
        this one)."""
        await rnd.sent.wait()
        digest = await self.weights_thread.run(lambda: rnd.payload.digest)
        log.info(
            "round_started",
            workers=[c.name for c in clients],
            present=present,
            round_id=rnd.round_id,
            model_digest=digest,
        )

    async def _run_round(
        self,
        number: int,
        clients: list[WorkerClient],
        index_of: Callable[[WorkerClient], int],
        present: int,
        skipped: list[Failure],
    ) -> RoundReport:
        start = time.perf_counter()
        self._attempts += 1
        rnd = RoundState.begin(self.model, self.architecture, f"{self.run_id}/{number}.{self._attempts}", number,
                               self.max_update_ratio)  # fmt: skip
        rnd.report.absent = skipped
        secure = await self._secure_setup(rnd, clients, index_of) if self.secure is not None else None
        if secure is not None:
            clients = [c for c in clients if secure.takes_part(c)]
        rnd.unsent = len(clients)
        if not clients:
            rnd.sent.set()
        rnd.announced = asyncio.create_task(self._announce(rnd, clients, present))
        self.observer.round_started(number, [c.name for c in clients])
        for f in skipped:
            self.observer.worker_phase(f.worker, f.phase, f.reason)
        rnd.sends = self.transfers.broadcasts(rnd.payload, clients)
        # A streaming rule gets each update folded into the sum as soon as its worker is done; another rule reads
        # them all once every worker is done.
        total = self._folder.new_sum(rnd) if self.aggregation.streams and secure is None else None
        steps = [self._train_and_fold(rnd, c, index_of(c), total, secure) for c in clients]
        outcomes = await asyncio.gather(
            *(asyncio.wait_for(s, self.round_timeout) for s in steps), return_exceptions=True
        )
        await rnd.announced
        done, failed, tainted = _settle(rnd, clients, outcomes, self.round_timeout)
        for f in failed:
            self._record_failure(rnd, f)
        if secure is None:
            await self._aggregate(rnd, done, clients, total, tainted)
        else:
            await self._aggregate_secure(rnd, done, clients, secure, tainted)
        report = rnd.report
        for c in done:
            c.stats.update_distance = c.distance
        report.workers = [c.stats for c in done]
        report.max_update_distance, report.aggregation = rnd.max_distance, str(self.aggregation)
        report.aggregation_seconds = rnd.aggregation_seconds
        log.debug("weights_aggregated", contributors=len(done), rule=str(self.aggregation))
        if self.federated_evaluation:
            await evaluate_federated(self.model, self.architecture, self.transfers, rnd, done)
        report.wall_seconds = elapsed(start)
        return report

    async def _aggregate(
        self,
        rnd: RoundState,
        done: list[Contribution],
        clients: list[WorkerClient],
        total: WeightedSum | None,
        tainted: bool,
    ) -> None:
        """The rule combines the updates that arrived; the strategy scales the result; it is installed."""
        updates = ArrivedUpdates(self._folder, rnd, done, total, partial(self._drop, rnd))
        if tainted:
            await updates.refold()
        self._require_quorum(rnd, done, clients)
        flat = await self.aggregation.combine(updates)
        self._require_quorum(rnd, done, clients)  # the rule may have dropped workers whose updates broke
        if isinstance(self.aggregation, GaussianMean):
            rnd.report.dp_clipping = dict(self.aggregation.last)
        if not self.aggregation.streams:
            for c in done:
                self.observer.worker_phase(c.name, "done")
        t = time.perf_counter()
        if type(self.aggregation) is WeightedMean:  # the others' result is not the mean the agreement reads
            rnd.report.update_agreement = await self._agreement(rnd, updates, flat)
        rnd.report.aggregate_scale = self.strategy.aggregate_scale([c.result for c in done])
        await self._install(rnd, flat)
        rnd.report.server_optimizer = self.server_optimizer.active
        self._choose_server_optimizer(rnd.report.update_agreement, done)
        rnd.aggregation_seconds += elapsed(t)

    async def _install(self, rnd: RoundState, flat: list[torch.Tensor]) -> None:
        await self.weights_thread.run(
            install_aggregate,
            self.model,
            self.server_optimizer,
            rnd,
            flat,
            rnd.report.aggregate_scale,
            self.strategy.lr_factor(rnd.number),
        )

    async def _agreement(self, rnd: RoundState, updates: ArrivedUpdates, flat: list[torch.Tensor]) -> float | None:
        arrived = updates.arrived
        if len(arrived) < 2:
            return None
        mean = await self.weights_thread.run(distance, flat, rnd.reference, rnd.payload.manifest)
        return update_agreement([u.distance for u in arrived], [u.weight for u in arrived], mean)

    def _choose_server_optimizer(self, agreement: float | None, done: list[Contribution]) -> None:
        """auto's choice, after the round that measured it: from the next round on, the workers and the server
        both run what it chose (a round trained without FedDyn's regulariser is not stepped as if it had been)."""
        if self.server_optimizer.chosen or agreement is None:
            return
        # FedDyn needs every worker's regulariser: with an older worker, stay with FedAvg rather than refuse it.
        old = [c.name for c in done if not speaks(c.client, "1.13")]
        self.server_optimizer.choose(agreement, feddyn=not old)
        self.strategy.feddyn_alpha = self.server_optimizer.worker_alpha
        log.info(
            "server_optimizer_chosen",
            server_optimizer=self.server_optimizer.active,
            update_agreement=round(agreement, 4),
            threshold=AUTO_AGREEMENT,
            **({"workers_before_1_13": old} if old else {}),
        )

    async def _aggregate_secure(
        self, rnd: RoundState, done: list[Contribution], clients: list[WorkerClient], secure: SecureRound, tainted: bool
    ) -> None:
        """The masked updates' sum, unmasked: the weighted mean, through the strategy and the server optimizer."""
        if tainted:
            for c, cause in await secure.refold(done):
                done.remove(c)
                self._drop(rnd, c, cause)
        self._require_quorum(rnd, done, clients)
        t = time.perf_counter()
        flat = await secure.unmask(done)
        rnd.report.aggregate_scale = self.strategy.aggregate_scale([c.result for c in done])
        await self._install(rnd, flat)
        rnd.aggregation_seconds += elapsed(t)
        rnd.report.secure_aggregation = secure.summary()
        if secure.dp is not None:
            rnd.report.dp_clipping = dict(secure.dp.last)

    async def _secure_setup(
        self, rnd: RoundState, clients: list[WorkerClient], index_of: Callable[[WorkerClient], int]
    ) -> SecureRound:
        """Keys and shares before any weights move; workers that cannot take part are this round's failures."""
        assert self.secure is not None
        dp = self.aggregation if isinstance(self.aggregation, GaussianMean) else None
        able = []
        for client in clients:
            try:
                _check_worker_supports(client, pb.TrainRequest(secure_aggregation=True))
                if dp is not None:  # an older worker would send its update unclipped and without noise
                    _require(client, "1.13", "distributed DP (--dp-noise-multiplier with --secure-aggregation)")
                able.append(client)
            except WorkerIncompatible as exc:
                self._record_failure(rnd, failure(client.name, PhaseError(PHASE, exc), 0))
        clients = able
        bounds = []
        for client in clients:
            request = self.strategy.configure_train(rnd.number, index_of(client))
            shard = client.info.train_samples if client.info is not None else 0
            batches = client.info.max_local_batches if client.info is not None else 0
            bounds.append(self.strategy.max_samples(request, shard, batches))
        unweighted = not getattr(self.strategy, "weighted", True)
        quorum = getattr(self.strategy, "min_workers", 0)
        max_weight = 1 if unweighted else max(bounds, default=1)
        secure = SecureRound(self.secure, rnd, clients, max_weight, unweighted, dp, quorum)
        for f in await secure.setup():
            self._record_failure(rnd, f)
        return secure

    # -- step 1: train, and for a streaming rule fold ----------------------------------------------------------

    def _progress(self, worker: str, stats: WorkerRound, progress: pb.TrainProgress) -> None:
        stats.saw_board(progress.health)
        if progress.HasField("health"):
            self.pacer.saw(worker, progress.health)
        self.observer.worker_progress(worker, progress)

    async def train_one(self, rnd: RoundState, client: WorkerClient, index: int, repeat: int = 0) -> Contribution:
        """Send the global model, train, and check the result before anything of the update is used. `repeat`: how
        often this worker trained from this model before (asynchronous mode), so that each time draws new batches."""
        stats = WorkerRound(client.name)
        t = time.perf_counter()
        self.observer.worker_phase(client.name, "sending")
        try:
            stats.bytes_sent = await client.set_weights(rnd.sends[client.name], rnd.payload.total_bytes)
        except WorkerError as exc:
            raise PhaseError("set_weights", exc) from exc
        finally:
            rnd.send_ended()
        stats.send_seconds = elapsed(t)
        request = self.strategy.configure_train(rnd.number, index)
        self.pacer.pace(client.name, request, client.info.train_samples if client.info is not None else 0)
        request.seed += repeat * 104_729
        request.round_id = rnd.round_id
        request.secure_aggregation = self.secure is not None
        if speaks(client, "1.5") and self.secure is None:
            request.update_encoding = offered(client, self.transfer.encoding)  # type: ignore[assignment]
        self.observer.worker_phase(client.name, "training")
        try:
            _check_worker_supports(client, request)
            result = await client.train(request, partial(self._progress, client.name, stats))
            _check_result(self.strategy, rnd, client, request, result)
        except WorkerError as exc:
            raise PhaseError("train", exc) from exc
        stats.samples, stats.train_seconds, stats.batches = result.samples, result.train_seconds, result.batches
        self.pacer.trained(client.name, result, stats.board_trouble)
        stats.train_loss, stats.train_accuracy = result.mean_loss, result.accuracy
        stats.dp_epsilon = result.dp_epsilon if result.HasField("dp_epsilon") else None
        if rnd.announced is not None:  # round_started is logged before anything of its workers
            await rnd.announced
        log.info(
            "worker_train_finished",
            worker=client.name,
            samples=result.samples,
            seconds=round(result.train_seconds, 3),
            loss=round(result.mean_loss, 4),
        )
        return Contribution(client, stats, result, self.strategy.weight(result))

    async def _train_and_fold(
        self, rnd: RoundState, client: WorkerClient, index: int, total: WeightedSum | None, secure: SecureRound | None
    ) -> Contribution:
        contribution = await self.train_one(rnd, client, index)
        if secure is not None:
            rnd.folding.add(client.name)
            self.observer.worker_phase(client.name, "receiving")
            t = time.perf_counter()
            try:
                await secure.fold(contribution)
            except (WorkerError, serde.WeightsError) as exc:
                raise PhaseError("get_masked_update", exc) from exc
            contribution.stats.receive_seconds = elapsed(t)
            self.observer.worker_phase(client.name, "done")
            return contribution
        if total is None:
            return contribution
        rnd.folding.add(client.name)
        self.observer.worker_phase(client.name, "receiving")
        try:
            await self._folder.fold(rnd, contribution, total)
        except (WorkerError, serde.WeightsError) as exc:
            raise PhaseError("get_weights", exc) from exc
        self.observer.worker_phase(client.name, "done")
        return contribution

    # -- step 2: settle ----------------------------------------------------------------------------------------

    def _drop(self, rnd: RoundState, c: Contribution, cause: BaseException) -> None:
        self._record_failure(rnd, failure(c.name, PhaseError("get_weights", cause), 0))

    def _record_failure(self, rnd: RoundState, failure: Failure) -> None:
        rnd.report.failures.append(failure)
        log.warning("worker_dropped", worker=failure.worker, phase=failure.phase, reason=failure.reason)
        self.observer.worker_phase(failure.worker, "dropped", f"{failure.phase}: {failure.reason}")

    def _require_quorum(self, rnd: RoundState, done: list[Contribution], clients: list[WorkerClient]) -> None:
        failures = rnd.report.failures
        if not self.strategy.accept([c.result for c in done], failures):
            reasons = "; ".join(f"{f.worker}: {f.reason}" for f in failures + rnd.report.absent)
            reasons = reasons or "no workers available"
            raise RoundFailed(
                f"round {rnd.number}: {len(done)} of {len(clients)} workers finished, below the quorum "
                f"(--min-workers) ({reasons}); the global model is unchanged",
                failures,
            )


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
        ("1.8", "not-true distillation (--not-true-distillation; 0 turns it off)", request.not_true_distillation),
        ("1.11", "DP-SGD (--dp-sgd-noise-multiplier)", request.dp_sgd_noise_multiplier),
        ("1.12", "secure aggregation (--secure-aggregation)", request.secure_aggregation),
        ("1.13", "FedDyn (--server-optimizer feddyn)", request.feddyn_alpha),
    ]
    for minimum, feature, used in needs:
        if used:
            _require(client, minimum, feature)


def _require(client: WorkerClient, minimum: str, feature: str) -> None:
    if client.info is not None:
        try:
            check_minimum(client.info.protocol_version, minimum, feature)
        except ProtocolMismatch as exc:
            raise WorkerIncompatible(client.name, str(exc)) from None


def _check_result(
    strategy: Strategy, rnd: RoundState, client: WorkerClient, request: pb.TrainRequest, result: pb.TrainResult
) -> None:
    if result.round_id != rnd.round_id:
        raise WorkerRejected(
            client.name,
            f"Train answered for round id {result.round_id!r}, expected {rnd.round_id!r}; its update was refused",
        )
    shard = client.info.train_samples if client.info is not None else 0
    max_batches = client.info.max_local_batches if client.info is not None else 0
    if result.HasField("dp_epsilon") and not 0 <= result.dp_epsilon < math.inf:
        raise WorkerRejected(
            client.name, f"reported a DP-SGD epsilon of {result.dp_epsilon}, not a number >= 0; its update was refused"
        )
    bound = strategy.max_samples(request, shard, max_batches)
    if not 0 < result.samples <= bound:
        raise WorkerRejected(
            client.name,
            f"reported {result.samples} training samples, outside 1..{bound} (what the round asked "
            f"for: {_work_asked(request)} on a shard of {shard}); its update was refused",
        )


def install_aggregate(
    model: torch.nn.Module,
    server_optimizer: ServerOptimizer,
    rnd: RoundState,
    flat: list[torch.Tensor],
    scale: float,
    lr_factor: float = 1.0,
) -> None:
    """The aggregate, moved `scale` times from the global model (the strategy's say, e.g. FedNova's) and through
    the server optimizer (at the round's learning-rate factor `lr_factor`), becomes the global model if it is
    finite."""
    if scale != 1.0:
        for g, a in zip(rnd.reference, flat):
            if a.is_floating_point():
                a.sub_(g).mul_(scale).add_(g)
    parameters = {name for name, _ in model.named_parameters()}
    server_optimizer.step(rnd.reference, flat, [meta.name in parameters for meta in rnd.payload.manifest], lr_factor)
    for meta, values in zip(rnd.payload.manifest, flat):
        # Finite in double precision is not enough: the model keeps its own dtype.
        if not (fits(values, meta.torch_dtype) if is_float(meta) else serde.all_finite(values)):
            raise RoundFailed(
                f"round {rnd.number}: the aggregate of {meta.name} holds NaN or Inf; the global model is unchanged",
                rnd.report.failures,
            )
    install(rnd.payload.manifest, flat, model.state_dict())


def _settle(
    rnd: RoundState, clients: list[WorkerClient], outcomes: list[Contribution | BaseException], round_timeout: float
) -> tuple[list[Contribution], list[Failure], bool]:
    """The workers that finished, those that failed and why, and whether a failed one left part of its update in
    the sum."""
    done, failed, tainted = [], [], False
    for client, outcome in zip(clients, outcomes):
        if isinstance(outcome, BaseException):
            tainted |= client.name in rnd.folding
            failed.append(failure(client.name, outcome, round_timeout))
        else:
            done.append(outcome)
    return done, failed, tainted
