"""What a worker adds to its update and the coordinator takes away again, element by element, modulo 2^32.

An update travels as P + 1 unsigned 32-bit integers: P quantised coordinates of (w / W) * delta, then the weight w
itself (its samples, or 1 when unweighted). W is the round's bound on any worker's weight, so every scaled
coordinate lies in [-clip, clip] once clipped. Quantisation is stochastic rounding to a grid of 1 / scale, with the
scale chosen so that the sum of N workers' integers, each at most B = (2^31 - 1) // N - 1 in size, never leaves the
signed 32-bit range: the modular sum, read as int32, is the true sum. Masks are ChaCha20 keystreams read as
little-endian uint32: a worker adds its self mask and, for each neighbour v, adds (u < v) or subtracts (u > v) the
pairwise mask they both derive, so the pairwise masks of two workers that both report cancel in the sum."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

MODULUS_BITS = 32
ELEMENT_BYTES = 4
LARGEST = 2**31 - 1
TAIL = 10  # the sum's noise stays within this many standard deviations: beyond, the chance is 1.5e-23 a coordinate
# A worker's noise deviation in integers is held to this: numpy draws Poisson variables with the variance they should
# have up to a mean of about 1e13 (at 1e15 it is 3% too large), and a finer grid gains nothing against the noise.
MAX_NOISE_STD = 2.0**20


@dataclass(frozen=True)
class DistributedNoise:
    """Distributed DP under secure aggregation: each worker clips its whole update to `clip_norm` (L2), quantises it
    and adds Skellam noise (the difference of two Poisson variables) to every integer. A sum of independent Skellam
    variables is Skellam, so the unmasked sum carries the noise of every worker in it, and nobody ever holds an
    un-noised sum. Each worker adds 1 / `survivors` of the variance that makes the sum's deviation `noise_multiplier`
    times its sensitivity, so any sum of at least `survivors` workers carries at least that; the coordinator never
    unmasks fewer. The sensitivity, in integers, is scale x clip_norm + sqrt(coordinates): one worker's clipped
    update, and at most one unit of rounding on each coordinate.

    With `count_stddev`, one more element carries adaptive clipping's count: +K/2 if the update was within the clip,
    -K/2 if not, plus Skellam noise of deviation count_stddev x K / sqrt(survivors)."""

    clip_norm: float
    noise_multiplier: float
    survivors: int
    coordinates: int
    count_stddev: float = 0.0

    def __post_init__(self) -> None:
        if not (0 < self.clip_norm < math.inf and 0 < self.noise_multiplier < math.inf):
            raise ValueError(
                f"distributed DP needs a positive clip norm and noise multiplier, got {self.clip_norm} and "
                f"{self.noise_multiplier}"
            )
        if self.survivors < 1 or self.coordinates < 0 or not 0 <= self.count_stddev < math.inf:
            raise ValueError(
                f"distributed DP needs survivors >= 1, coordinates >= 0 and count_stddev >= 0, got {self.survivors}, "
                f"{self.coordinates} and {self.count_stddev}"
            )

    def spread(self, workers: int) -> float:
        """How many of the sum's integers one unit of a worker's noise deviation becomes, out to the tail."""
        return TAIL * self.noise_multiplier * math.sqrt(workers / self.survivors)

    def sensitivity(self, scale: float) -> float:
        return scale * self.clip_norm + math.sqrt(self.coordinates)

    def skellam_mu(self, scale: float) -> float:
        """Each worker's Skellam parameter: variance 2 mu = (noise_multiplier x sensitivity)^2 / survivors."""
        return (self.noise_multiplier * self.sensitivity(scale)) ** 2 / self.survivors / 2

    def sum_std(self, scale: float, workers: int) -> float:
        """The deviation of the noise in a sum of `workers` updates, in the update's own units."""
        return self.noise_multiplier * self.sensitivity(scale) * math.sqrt(workers / self.survivors) / scale

    def count_scale(self, workers: int) -> int:
        """K: an even integer such that the sum of `workers` counts and their noise stays within int32."""
        k = int(LARGEST / (workers / 2 + TAIL * self.count_stddev * math.sqrt(workers / self.survivors) + 1))
        return k - k % 2

    def count_mu(self, workers: int) -> float:
        return (self.count_stddev * self.count_scale(workers)) ** 2 / self.survivors / 2


def skellam(mu: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """n draws of Skellam(mu, mu) as int64: variance 2 mu."""
    return rng.poisson(mu, n) - rng.poisson(mu, n)


def wrap(values: np.ndarray) -> np.ndarray:
    """int64 as uint32, modulo 2^32."""
    return values.astype(np.uint32)


@dataclass(frozen=True)
class Quantizer:
    clip: float  # each scaled coordinate is clipped to [-clip, clip]
    workers: int  # N: the most updates one sum holds
    max_weight: int  # W: no worker's weight is larger
    noise: DistributedNoise | None = None  # leaves the sum room for its noise out to TAIL deviations

    def __post_init__(self) -> None:
        if not (self.clip > 0 and np.isfinite(self.clip)):
            raise ValueError(f"the clipping range must be a positive number, got {self.clip}")
        if self.workers < 1 or self.max_weight < 1:
            raise ValueError(f"workers and max_weight must be at least 1, got {self.workers} and {self.max_weight}")
        if self.noise is not None and self.scale <= 0:
            raise ValueError(
                f"noise multiplier {self.noise.noise_multiplier:g} is too large for {self.noise.coordinates} "
                f"coordinates in {MODULUS_BITS}-bit integers"
            )
        if self.bound < 1:
            raise ValueError(f"{self.workers} workers leave no room in {MODULUS_BITS}-bit integers")
        if self.workers * self.max_weight >= 2**31:
            raise ValueError(f"the sum of {self.workers} weights of up to {self.max_weight} would wrap")

    @property
    def bound(self) -> int:
        """B: the largest integer one worker's coordinate becomes, before any noise."""
        if self.noise is None:
            return LARGEST // self.workers - 1
        return math.floor(self.scale * self.clip)

    @property
    def scale(self) -> float:
        """Integers a unit. With noise: N (scale clip + 1) + TAIL x the noise's deviation in the sum <= 2^31 - 1,
        and no worker's noise deviation above MAX_NOISE_STD."""
        if self.noise is None:
            return self.bound / self.clip
        n = self.noise
        spread = n.spread(self.workers)
        room = LARGEST - self.workers - spread * math.sqrt(n.coordinates)
        fits = room / (self.workers * self.clip + spread * n.clip_norm)
        drawable = (
            MAX_NOISE_STD * math.sqrt(n.survivors) / n.noise_multiplier - math.sqrt(n.coordinates)
        ) / n.clip_norm
        return min(fits, drawable)

    @property
    def step(self) -> float:
        """One unit of the grid, in the update's own units once the sum is divided by the total weight W_total:
        each worker's rounding moves its coordinate by less than this times W / W_total."""
        return 1.0 / self.scale

    def error_bound(self, contributors: int, total_weight: int) -> float:
        """How far, per coordinate, the unmasked mean update may be from the exact weighted mean of the same
        (unclipped) updates: each of `contributors` roundings is off by less than one step."""
        return contributors * self.step * self.max_weight / total_weight

    def quantize(
        self, delta: np.ndarray, weight: int, rng: np.random.Generator, factor: float = 1.0
    ) -> tuple[np.ndarray, int]:
        """The coordinates of factor * (weight / W) * delta as integers mod 2^32, and how many were clipped. In place
        on one float64 copy: on a Pi's CPU share every pass over a large model counts."""
        grid = np.multiply(delta, factor * weight / self.max_weight * self.scale, dtype=np.float64)
        bound = float(self.bound)
        clipped = 0
        if len(grid) and not -bound <= grid.min() <= grid.max() <= bound:  # NaN too
            clipped = int(np.count_nonzero(~(np.abs(grid) <= bound)))
            np.clip(np.nan_to_num(grid, copy=False), -bound, bound, out=grid)
        grid += rng.random(len(grid))
        np.floor(grid, out=grid)  # unbiased: E[floor(x + U)] = x, and within [-B, B]
        return grid.astype(np.int32).view(np.uint32), clipped

    def elements(self, coordinates: int) -> int:
        """A masked update's length: the coordinates, adaptive clipping's noised count if it carries one, the weight."""
        return coordinates + (1 if self.noise is not None and self.noise.count_stddev else 0) + 1

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
