"""Shamir's secret sharing over GF(2^521 - 1): a secret of up to 64 bytes split so that any `threshold` shares
rebuild it and fewer say nothing about it. Holders are numbered 1..n (their x-coordinates)."""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping

PRIME = 2**521 - 1  # a Mersenne prime: every 64-byte secret is an element of the field
SHARE_BYTES = 66  # a field element, big-endian
MAX_SECRET_BYTES = 64


class ShareError(ValueError):
    """Shares that cannot rebuild a secret: too few, or malformed."""


def split(secret: bytes, holders: Iterable[int], threshold: int) -> dict[int, bytes]:
    """One share for each holder; any `threshold` of them rebuild `secret`."""
    holders = list(holders)
    if len(secret) > MAX_SECRET_BYTES:
        raise ValueError(f"a secret is at most {MAX_SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(holders):
        raise ValueError(f"threshold {threshold} must be between 1 and the {len(holders)} holders")
    if len(set(holders)) != len(holders) or any(not 0 < x < PRIME for x in holders):
        raise ValueError(f"holders must be distinct positive numbers, got {holders}")
    # f(0) = secret; f(x) = secret + c1 x + ... + c_{t-1} x^{t-1}, the c_i uniform in the field.
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x).to_bytes(SHARE_BYTES, "big") for x in holders}


def combine(shares: Mapping[int, bytes], threshold: int, length: int) -> bytes:
    """The secret of `length` bytes from at least `threshold` shares (Lagrange interpolation at 0)."""
    if len(shares) < threshold:
        raise ShareError(f"{len(shares)} shares cannot rebuild a secret that needs {threshold}")
    points = list(shares.items())[:threshold]
    for x, y in points:
        if len(y) != SHARE_BYTES or not 0 < x < PRIME:
            raise ShareError(f"a share is a holder number and {SHARE_BYTES} bytes; got holder {x}, {len(y)} bytes")
    secret = 0
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                numerator = numerator * -xj % PRIME
                denominator = denominator * (xi - xj) % PRIME
        secret = (secret + int.from_bytes(yi, "big") * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 256**length:
        raise ShareError("the shares do not rebuild a secret of this length: they are not shares of one secret")
    return secret.to_bytes(length, "big")


def _evaluate(coefficients: list[int], x: int) -> int:
    value = 0
    for c in reversed(coefficients):
        value = (value * x + c) % PRIME
    return value
