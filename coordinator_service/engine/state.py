"""What one round is made of: its state while it runs, each worker's part in it, and its report."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from coordinator_service.engine.aggregate import UpdateCheck, flat_reference, model_norm
from coordinator_service.engine.worker_client import WorkerClient
from coordinator_service.policy.strategy import Failure
from fedpi.weights import serde
from generated.fedpi.v1 import worker_pb2 as pb


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
    # Its board while it trained (protocol 1.10): the highest CPU temperature reported, and whether it was ever
    # throttled or under-volted.
    cpu_temperature_celsius: float | None = None
    board_trouble: bool = False
    staleness: int | None = None  # asynchronous mode: server versions made since the one it trained from
    dp_epsilon: float | None = None  # DP-SGD: the epsilon its data has spent in the run, as it reports

    def saw_board(self, health: pb.BoardHealth) -> None:
        if health.HasField("cpu_temperature_celsius"):
            self.cpu_temperature_celsius = max(self.cpu_temperature_celsius or -273.15, health.cpu_temperature_celsius)
        self.board_trouble |= health.throttled or health.under_voltage

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
    version: int | None = None  # asynchronous mode: the server version this report made (= round)
    idle_fraction: dict[str, float] | None = None  # asynchronous mode: each worker's idle share of the run so far
    dp_epsilon: float | None = None  # worker-level DP: epsilon spent by the end of this round, at the run's delta
    dp_epsilon_coordinator: float | None = None  # distributed DP: the same against the coordinator (no sampling)
    secure_aggregation: dict | None = None  # engine.secure.SecureRound.summary
    dp_clipping: dict | None = None  # worker-level DP: the clip norm, the noise, and where adaptive clipping moved it
    update_agreement: float | None = None  # fedavg's rule: how alike the updates were (policy.server_opt)
    server_optimizer: str | None = None  # what stepped the model this round (auto: fedavg until it chose)

    @property
    def dp_sgd_epsilons(self) -> list[float]:
        return [w.dp_epsilon for w in self.workers if w.dp_epsilon is not None]

    @property
    def overhead_seconds(self) -> float:
        """Round wall time beyond the slowest worker's pure training (the coordinator's evaluation is not in the
        round's wall time: see RoundFinisher). A version (asynchronous mode) has no slowest worker to wait for: its
        overhead is the time the coordinator spent receiving, folding and stepping."""
        if self.version is not None:
            return self.aggregation_seconds
        return self.wall_seconds - max((w.train_seconds for w in self.workers), default=0.0)

    def as_event(self) -> dict:
        return {
            "round": self.round,
            **({"version": self.version} if self.version is not None else {}),
            **({"idle_fraction": self.idle_fraction} if self.idle_fraction is not None else {}),
            **({"dp_epsilon": round(self.dp_epsilon, 4)} if self.dp_epsilon is not None else {}),
            **(
                {"dp_epsilon_coordinator": round(self.dp_epsilon_coordinator, 4)}
                if self.dp_epsilon_coordinator is not None
                else {}
            ),
            **({"dp_sgd_epsilon": round(max(sgd), 4)} if (sgd := self.dp_sgd_epsilons) else {}),
            **({"secure_aggregation": self.secure_aggregation} if self.secure_aggregation is not None else {}),
            **({"dp_clipping": self.dp_clipping} if self.dp_clipping is not None else {}),
            **({"update_agreement": round(self.update_agreement, 4)} if self.update_agreement is not None else {}),
            **({"server_optimizer": self.server_optimizer} if self.server_optimizer is not None else {}),
            **(
                {"test_accuracy": round(self.test_accuracy, 4), "test_loss": round(self.test_loss, 4)}
                if self.test_accuracy is not None and self.test_loss is not None
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
                if self.federated_accuracy is not None and self.federated_loss is not None
                else {}
            ),
            "samples": sum(w.samples for w in self.workers),
            "workers": {
                w.worker: {
                    **{
                        k: (round(v, 4) if isinstance(v, float) else v)
                        for k, v in asdict(w).items()
                        if k != "worker" and v is not None  # a board that reports no temperature has none
                    },
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


class PhaseError(Exception):
    """A worker failed in one phase of the round (set_weights, train, get_weights)."""

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

    # What an aggregation rule reads of it (coordinator_service.policy.rules.Update).
    @property
    def name(self) -> str:
        return self.client.name

    @property
    def distance(self) -> float:
        return self.check.distance if self.check is not None else 0.0


@dataclass
class RoundState:
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

    @classmethod
    def begin(
        cls, model: torch.nn.Module, architecture: str, round_id: str, number: int, max_update_ratio: float
    ) -> RoundState:
        """Round `number` of `model`: the payload every worker is sent, and the bound on how far an update may be
        from it (`max_update_ratio` times the model's norm, at least 1)."""
        state = model.state_dict()
        payload = serde.WeightsPayload(state, round=number, architecture=architecture, round_id=round_id)
        reference = flat_reference(state, payload.manifest)
        max_distance = max_update_ratio * max(model_norm(reference, payload.manifest), 1.0)
        return cls(number, round_id, payload, reference, max_distance, RoundReport(number))

    def send_ended(self) -> None:
        self.unsent -= 1
        if self.unsent <= 0:
            self.sent.set()


def failure(worker: str, exc: BaseException, round_timeout: float) -> Failure:
    if isinstance(exc, PhaseError):
        return Failure(worker, exc.phase, str(exc.cause))
    if isinstance(exc, asyncio.TimeoutError):
        return Failure(worker, "round", f"did not finish within the round timeout of {round_timeout:.0f} s")
    return Failure(worker, "round", f"{type(exc).__name__}: {exc}")
