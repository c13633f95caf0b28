"""The digests a weight stream may carry, and which is fastest on this CPU."""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import xxhash

DIGEST_PREFIX = "sha256:"


# The digests a stream may carry. sha256 everywhere; since protocol 1.5 also BLAKE2b-512, about twice as fast on CPUs
# without SHA instructions (a Raspberry Pi 4); since 1.6 also XXH3-128, over twenty times faster than either. A digest
# here catches bytes corrupted in transit or in memory: a sender can always send a matching digest for bytes it made up
# (the update checks deal with that), and TLS authenticates the bytes on the wire. A checksum does this job.
DIGESTS: dict[str, Callable[..., Any]] = {
    "sha256": hashlib.sha256,
    "blake2b": hashlib.blake2b,
    "xxh3_128": xxhash.xxh3_128,
}


DIGESTS_BEFORE_1_6 = ("sha256", "blake2b")


def digest_of(views: Sequence[memoryview]) -> str:
    h = hashlib.sha256()
    for v in views:
        h.update(v)
    return DIGEST_PREFIX + h.hexdigest()


@functools.cache
def digests_by_speed() -> tuple[str, ...]:
    """DIGESTS, fastest first on this CPU, measured once on 4 MiB: sha256 beats blake2b where the CPU has SHA
    instructions (x86-64 with SHA-NI, ARMv8.2 such as a Pi 5), not where it lacks them (a Pi 4)."""
    data = bytes(4 << 20)

    def seconds(name: str) -> float:
        start = time.perf_counter()
        DIGESTS[name](data).digest()
        return time.perf_counter() - start

    return tuple(sorted(DIGESTS, key=lambda name: min(seconds(name) for _ in range(3))))


def fastest_digest(accepted: Iterable[str] = tuple(DIGESTS)) -> str | None:
    """The digest this CPU computes fastest of those `accepted` (None if it knows none of them)."""
    accepted = set(accepted)
    return next((name for name in digests_by_speed() if name in accepted), None)
