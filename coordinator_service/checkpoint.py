"""The coordinator's state after each completed round, written atomically, so a crash loses at most one round."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointMismatch(Exception):
    """The checkpoint belongs to another kind of run (another model)."""


@dataclass
class Checkpoint:
    round: int
    model: str
    state_dict: dict[str, torch.Tensor]
    metrics: list[dict]
    rng: dict

    @staticmethod
    def capture_rng() -> dict:
        return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}

    def restore_rng(self) -> None:
        torch.set_rng_state(self.rng["torch"])
        random.setstate(self.rng["python"])
        np.random.set_state(self.rng["numpy"])


def save(directory: Path, ckpt: Checkpoint) -> Path:
    """Write to a temporary file, fsync, then rename over the old one: a reader sees the old or the new, never half."""
    path = directory / CHECKPOINT_NAME
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        torch.save(ckpt.__dict__, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load(directory: Path, model: str) -> Checkpoint | None:
    path = directory / CHECKPOINT_NAME
    if not path.is_file():
        return None
    # weights_only=False: the file also holds RNG state; it is our own file, in our own output directory.
    ckpt = Checkpoint(**torch.load(path, weights_only=False))
    if ckpt.model != model:
        raise CheckpointMismatch(f"{path} is a {ckpt.model!r} run, this run trains {model!r}: "
                                 f"use another --output-dir or the same --model")
    return ckpt
