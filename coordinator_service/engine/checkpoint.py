"""The coordinator's state after each finished round (evaluated, logged), written atomically: a crash loses the round
that was training and at most the one before it, still being evaluated (docs/guide.md, Coordinator)."""

from __future__ import annotations

import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpi import durable
from fedpi.weights import serde

CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointMismatch(Exception):
    """The checkpoint belongs to another kind of run (another model), or cannot be read as a checkpoint."""


@dataclass
class Checkpoint:
    round: int
    model: str
    state_dict: dict[str, torch.Tensor]
    metrics: list[dict]
    rng: dict
    server_optimizer: dict = field(default_factory=dict)  # its state (momentum, second moments), if it keeps one
    aggregation: dict = field(default_factory=dict)  # the rule's state (an adaptive clip norm), if it keeps one

    @staticmethod
    def capture_rng() -> dict:
        # Plain types and tensors only, so that the file loads with torch.load(weights_only=True).
        legacy: Any = np.random.get_state()  # the tuple form, which torch.save keeps as it is
        kind, keys, pos, has_gauss, cached = legacy
        return {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        }

    def restore_rng(self) -> None:
        torch.set_rng_state(self.rng["torch"])
        version, state, gauss = self.rng["python"]
        random.setstate((version, tuple(state), gauss))
        kind, keys, pos, has_gauss, cached = self.rng["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def save(directory: Path, ckpt: Checkpoint) -> Path:
    """Write to a temporary file, fsync, then rename over the old one: a reader sees the old or the new, never half."""
    for name, t in ckpt.state_dict.items():
        if not serde.all_finite(t):
            raise ValueError(f"refusing to checkpoint a model whose {name} holds NaN or Inf")
    path = directory / CHECKPOINT_NAME
    durable.write_with(path, lambda f: torch.save(ckpt.__dict__, f))
    return path


def load(directory: Path, model: str) -> Checkpoint | None:
    path = directory / CHECKPOINT_NAME
    if not path.is_file():
        return None
    # weights_only: tensors and plain types, never arbitrary objects, even from a file someone else put there.
    try:
        ckpt = Checkpoint(**torch.load(path, weights_only=True))
    except (pickle.UnpicklingError, RuntimeError, TypeError) as exc:
        raise CheckpointMismatch(
            f"{path} is not a fedpi checkpoint that loads as weights only ({exc}); "
            f"move it away or use another --output-dir"
        ) from None
    if ckpt.model != model:
        raise CheckpointMismatch(
            f"{path} is a {ckpt.model!r} run, this run trains {model!r}: use another --output-dir or the same --model"
        )
    return ckpt
