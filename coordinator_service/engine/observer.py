"""What a run tells its onlookers (the terminal's live view, Prometheus) as it goes. The round loop calls these hooks;
an observer never changes what the run does, and one that raises is logged and ignored."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import structlog

from generated.fedpi.v1 import worker_pb2 as pb

if TYPE_CHECKING:
    from coordinator_service.engine.rounds import RoundReport
    from coordinator_service.policy.strategy import Failure

log = structlog.get_logger()

# A worker's phases within a round, in order; "dropped" ends it early.
PHASES = ("waiting", "sending", "training", "receiving", "done", "dropped")


class RunObserver:
    """Every hook is a no-op here; observers override what they show."""

    def run_started(self, rounds: int, first_round: int, workers: Sequence[str]) -> None: ...

    def workers_present(self, workers: Sequence[str]) -> None: ...

    def workers_away(self, away: Sequence[Failure]) -> None: ...

    def round_started(self, number: int, workers: Sequence[str]) -> None: ...

    def worker_phase(self, worker: str, phase: str, detail: str = "") -> None: ...

    def worker_progress(self, worker: str, progress: pb.TrainProgress) -> None: ...

    def round_finished(self, report: RoundReport) -> None: ...

    def round_failed(self, number: int, reason: str) -> None: ...

    def run_finished(self) -> None: ...


class Observers(RunObserver):
    """Hands every hook to each observer in turn."""

    def __init__(self, observers: Sequence[RunObserver] = ()):
        self.observers = list(observers)

    def _each(self, hook: str, *args) -> None:
        for observer in self.observers:
            try:
                getattr(observer, hook)(*args)
            except Exception:  # an onlooker must never break training
                log.exception("observer_failed", observer=type(observer).__name__, hook=hook)

    def run_started(self, rounds, first_round, workers):
        self._each("run_started", rounds, first_round, workers)

    def workers_present(self, workers):
        self._each("workers_present", workers)

    def workers_away(self, away):
        self._each("workers_away", away)

    def round_started(self, number, workers):
        self._each("round_started", number, workers)

    def worker_phase(self, worker, phase, detail=""):
        self._each("worker_phase", worker, phase, detail)

    def worker_progress(self, worker, progress):
        self._each("worker_progress", worker, progress)

    def round_finished(self, report):
        self._each("round_finished", report)

    def round_failed(self, number, reason):
        self._each("round_failed", number, reason)

    def run_finished(self):
        self._each("run_finished")
