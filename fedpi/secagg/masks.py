"""What a worker adds to its update and the coordinator takes away again, element by element, modulo 2^32.

An update travels as P + 1 unsigned 32-bit integers: P quantised coordinates of (w / W) * delta, then the weight w
itself (its samples, or 1 when unweighted). W is the round's bound on any worker's weight, so every scaled
coordinate lies in [-clip, clip] once clipped. Quantisation is stochastic rounding to a grid of 1 / scale, with the
scale chosen so that the sum of N workers' integers, each at most B = (2^31 - 1) // N - 1 in size, never leaves the
signed 32-bit range: the modular sum, read as int32, is the true sum. Masks are ChaCha20 keystreams read as
little-endian uint32: a worker adds its self mask and, for each neighbour v, adds (u < v) or subtracts (u > v) the
pairwise mask they both derive, so the pairwise masks of two workers that both report cancel in the sum."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

MODULUS_BITS = 32
ELEMENT_BYTES = 4


@dataclass(frozen=True)
class Quantizer:
    clip: float  # each scaled coordinate is clipped to [-clip, clip]
    workers: int  # N: the most updates one sum holds
    max_weight: int  # W: no worker's weight is larger

    def __post_init__(self) -> None:
        if not (self.clip > 0 and np.isfinite(self.clip)):
            raise ValueError(f"the clipping range must be a positive number, got {self.clip}")
        if self.workers < 1 or self.max_weight < 1:
            raise ValueError(f"workers and max_weight must be at least 1, got {self.workers} and {self.max_weight}")
        if self.bound < 1:
            raise ValueError(f"{self.workers} workers leave no room in {MODULUS_BITS}-bit integers")
        if self.workers * self.max_weight >= 2**31:
            raise ValueError(f"the sum of {self.workers} weights of up to {self.max_weight} would wrap")

    @property
    def bound(self) -> int:
        """B: the largest integer one worker's coordinate becomes."""
        return (2**31 - 1) // self.workers - 1

    @property
    def scale(self) -> float:
        return self.bound / self.clip

    @property
    def step(self) -> float:
        """One unit of the grid, in the update's own units once the sum is divided by the total weight W_total:
        each worker's rounding moves its coordinate by less than this times W / W_total."""
        return 1.0 / self.scale

    def error_bound(self, contributors: int, total_weight: int) -> float:
        """How far, per coordinate, the unmasked mean update may be from the exact weighted mean of the same
        (unclipped) updates: each of `contributors` roundings is off by less than one step."""
        return contributors * self.step * self.max_weight / total_weight

    def quantize(self, delta: np.ndarray, weight: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """The coordinates of (weight / W) * delta as integers mod 2^32, and how many were clipped. In place on one
        float64 copy: on a Pi's CPU share every pass over a large model counts."""
        grid = np.multiply(delta, weight / self.max_weight * self.scale, dtype=np.float64)
        bound = float(self.bound)
        clipped = 0
        if len(grid) and not -bound <= grid.min() <= grid.max() <= bound:  # NaN too
            clipped = int(np.count_nonzero(~(np.abs(grid) <= bound)))
            np.clip(np.nan_to_num(grid, copy=False), -bound, bound, out=grid)
        grid += rng.random(len(grid))
        np.floor(grid, out=grid)  # unbiased: E[floor(x + U)] = x, and within [-B, B]
        return grid.astype(np.int32).view(np.uint32), clipped

    def weight_element(self, weight: int) -> np.ndarray:
        if not 0 <= weight <= self.max_weight:
            raise ValueError(f"weight {weight} is outside 0..{self.max_weight}, the round's bound")
        return np.array([weight], dtype=np.uint32)

    def mean_delta(self, coordinates: np.ndarray, total_weight: int) -> np.ndarray:
        """The weighted mean update from the unmasked sum of the coordinates."""
        signed = coordinates.view(np.int32).astype(np.float64)
        return signed / self.scale * (self.max_weight / total_weight)


class MaskStream:
    """A mask as a stream of uint32, read in order, a chunk at a time: the ChaCha20 keystream of a 32-byte seed."""

    def __init__(self, seed: bytes):
        self._keystream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()

    def next(self, elements: int) -> np.ndarray:
        return np.frombuffer(self._keystream.update(bytes(elements * ELEMENT_BYTES)), dtype="<u4")

    def __repr__(self) -> str:
        return "MaskStream(…)"


@dataclass
class SignedMask:
    stream: MaskStream
    sign: int  # +1: added, -1: subtracted


def pairwise_sign(me: int, peer: int) -> int:
    return 1 if me < peer else -1


def apply(values: np.ndarray, masks: Iterable[SignedMask]) -> np.ndarray:
    """values + sum(sign * mask) mod 2^32, for the next len(values) elements of each mask."""
    out = values.astype(np.uint32, copy=True)
    for m in masks:
        if m.sign > 0:
            out += m.stream.next(len(out))
        else:
            out -= m.stream.next(len(out))
    return out


def chunked(pieces: Iterable[np.ndarray], elements: int) -> Iterator[np.ndarray]:
    """Re-cut a sequence of 1-D arrays into arrays of `elements` (the last one shorter), copying at most one chunk."""
    pending: list[np.ndarray] = []
    held = 0
    for piece in pieces:
        while len(piece):
            take = min(elements - held, len(piece))
            pending.append(piece[:take])
            held += take
            piece = piece[take:]
            if held == elements:
                yield np.concatenate(pending) if len(pending) > 1 else pending[0]
                pending, held = [], 0
    if held:
        yield np.concatenate(pending) if len(pending) > 1 else pending[0]
