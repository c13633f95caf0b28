"""Round strategies: what each worker is asked to do, how much its update weighs, and whether a round counts."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from generated.fedpi.v1 import worker_pb2 as pb


@dataclass(frozen=True)
class Failure:
    worker: str
    phase: str  # handshake, set_weights, train, get_weights
    reason: str


class Strategy(ABC):
    """A federated averaging policy. The round loop calls these and never decides anything itself."""

    @abstractmethod
    def configure_train(self, server_round: int, worker_index: int) -> pb.TrainRequest:
        """The Train request for one worker in one round."""

    @abstractmethod
    def weight(self, result: pb.TrainResult) -> float:
        """How much this worker's update counts in the average."""

    def max_samples(self, request: pb.TrainRequest, shard_size: int) -> int:
        """The most samples a worker can honestly report for `request` on a shard of `shard_size` (from its
        handshake): batches x batch size, or epochs x shard. A report above it is refused, so that no worker can
        make itself the whole average by claiming samples it never trained on."""
        if request.local_batches:
            return request.local_batches * request.batch_size
        return request.local_epochs * shard_size

    @abstractmethod
    def accept(self, results: Sequence[pb.TrainResult], failures: Sequence[Failure]) -> bool:
        """Whether enough workers succeeded for the round's average to replace the global model."""


class FedAvg(Strategy):
    """Federated averaging, weighted by the samples each worker trained on (McMahan et al., 2017).

    With `weighted=False` every worker counts the same, as the old PySyft example did. With `proximal_mu` > 0 the
    workers train with FedProx's proximal term (Li et al., "Federated Optimization in Heterogeneous Networks", 2020).
    """

    def __init__(self, *, local_batches: int = 50, local_epochs: int = 0, batch_size: int = 64,
                 learning_rate: float = 0.01, momentum: float = 0.0, seed: int = 0, min_workers: int = 1,
                 weighted: bool = True, evaluate_locally: bool = False, lr_decay: float = 1.0,
                 proximal_mu: float = 0.0):
        self.local_batches = local_batches
        self.local_epochs = local_epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.seed = seed
        self.min_workers = min_workers
        self.weighted = weighted
        self.evaluate_locally = evaluate_locally
        self.lr_decay = lr_decay  # the local learning rate of round r is learning_rate x lr_decay^(r-1)
        self.proximal_mu = proximal_mu  # FedProx (Li et al., 2020) when positive

    def configure_train(self, server_round: int, worker_index: int) -> pb.TrainRequest:
        return pb.TrainRequest(
            round=server_round, local_batches=self.local_batches, local_epochs=self.local_epochs,
            batch_size=self.batch_size, learning_rate=self.learning_rate * self.lr_decay ** (server_round - 1),
            momentum=self.momentum,
            # Distinct per round and worker, reproducible from --seed.
            seed=self.seed * 1_000_003 + server_round * 1_009 + worker_index,
            evaluate=self.evaluate_locally, proximal_mu=self.proximal_mu,
        )

    def weight(self, result: pb.TrainResult) -> float:
        return float(result.samples) if self.weighted else 1.0

    def accept(self, results: Sequence[pb.TrainResult], failures: Sequence[Failure]) -> bool:
        return len(results) >= self.min_workers
