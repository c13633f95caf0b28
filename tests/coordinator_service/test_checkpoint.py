"""Checkpoints hold tensors and plain values only, never a non-finite model, and never run code when loaded."""

from __future__ import annotations

import pytest
import torch

from coordinator_service.engine import checkpoint
from fedpi.net.auth import ServerSecurity
from fedpi.net.client import ClientSecurity


class _Payload:
    def __reduce__(self):
        return (open, ("/tmp/fedpi-checkpoint-exploit", "w"))


def _ckpt(state) -> checkpoint.Checkpoint:
    return checkpoint.Checkpoint(
        round=2,
        model="m",
        state_dict=state,
        metrics=[{"round": 1, "test_accuracy": 0.5}],
        rng=checkpoint.Checkpoint.capture_rng(),
    )


def test_a_checkpoint_round_trips_with_weights_only(tmp_path):
    state = torch.nn.Linear(3, 2).state_dict()
    checkpoint.save(tmp_path, _ckpt(state))
    loaded = checkpoint.load(tmp_path, "m")
    assert loaded.round == 2 and loaded.metrics[0]["test_accuracy"] == 0.5
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in state.items())
    loaded.restore_rng()


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    target = __import__("pathlib").Path("/tmp/fedpi-checkpoint-exploit")
    target.unlink(missing_ok=True)
    torch.save(
        {"round": 1, "model": "m", "state_dict": {}, "metrics": [], "rng": _Payload()},
        tmp_path / checkpoint.CHECKPOINT_NAME,
    )
    with pytest.raises(checkpoint.CheckpointMismatch, match="weights only"):
        checkpoint.load(tmp_path, "m")
    assert not target.exists()


def test_a_non_finite_model_is_never_checkpointed(tmp_path):
    state = {"w": torch.tensor([1.0, float("inf")])}
    with pytest.raises(ValueError, match="NaN or Inf"):
        checkpoint.save(tmp_path, _ckpt(state))
    assert not (tmp_path / checkpoint.CHECKPOINT_NAME).exists()


def test_tokens_never_appear_in_a_repr():
    assert "s3cret" not in repr(ClientSecurity(token="s3cret"))
    assert "s3cret" not in repr(ServerSecurity(token="s3cret"))
