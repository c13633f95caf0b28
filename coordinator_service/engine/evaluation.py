"""Federated evaluation: after a round, its workers evaluate the new global model on their own test splits."""

from __future__ import annotations

import asyncio

import structlog
import torch

from coordinator_service.engine.state import Contribution, RoundState
from coordinator_service.engine.transfer import Transfers
from coordinator_service.engine.worker_errors import WorkerRejected
from fedpi.net.protocol import check_minimum
from fedpi.weights import serde

log = structlog.get_logger()


async def evaluate_federated(
    model: torch.nn.Module, architecture: str, transfers: Transfers, rnd: RoundState, done: list[Contribution]
) -> None:
    """Send the new global model to the round's workers and have each evaluate it on its local test split; the
    round reports the mean weighted by test samples. A worker that fails here keeps its update in the round."""
    payload = serde.WeightsPayload(
        model.state_dict(), round=rnd.number, architecture=architecture, round_id=f"{rnd.round_id}/eval"
    )
    sends = transfers.broadcasts(payload, [c.client for c in done])
    outcomes = await asyncio.gather(
        *(_evaluate_on(payload, sends[c.client.name], c) for c in done), return_exceptions=True
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


async def _evaluate_on(payload: serde.WeightsPayload, send: serde.Broadcast, c: Contribution) -> None:
    if c.client.info is not None:
        check_minimum(c.client.info.protocol_version, "1.3", "federated evaluation (--federated-evaluation)")
    await c.client.set_weights(send, payload.total_bytes)
    result = await c.client.evaluate(payload.round_id)
    if result.round_id != payload.round_id:
        raise WorkerRejected(c.client.name, f"Evaluate answered for round id {result.round_id!r}")
    c.stats.eval_loss, c.stats.eval_accuracy, c.stats.eval_samples = result.loss, result.accuracy, result.samples
