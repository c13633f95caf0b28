"""The pieces of secure aggregation both ends share: Shamir's scheme, the quantiser and its bound, mask streams."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedpi.secagg import shamir
from fedpi.secagg.keys import KeyPair, SealedShareRefused, commitment, open_sealed, seal
from fedpi.secagg.masks import MaskStream, Quantizer, chunked

SECRET = bytes(range(32))


def test_any_threshold_of_the_shares_rebuild_the_secret_and_fewer_do_not():
    shares = shamir.split(SECRET, [1, 2, 3, 4, 5], 3)
    for chosen in itertools.combinations(shares, 3):
        assert shamir.combine({x: shares[x] for x in chosen}, 3, 32) == SECRET
    with pytest.raises(shamir.ShareError, match="2 shares cannot rebuild a secret that needs 3"):
        shamir.combine({1: shares[1], 2: shares[2]}, 3, 32)


def test_fewer_than_threshold_shares_fit_every_secret_equally():
    """Two shares of a threshold-3 sharing, with a third forged for any other secret, rebuild that secret: the two
    real shares alone say nothing about the secret."""
    shares = shamir.split(SECRET, [1, 2, 3], 3)
    other = b"\xff" * 32
    forged = shamir.split(other, [1, 2, 3], 2)  # a line through (0, other): pick its point at 3 ...
    # ... then the unique quadratic through the two real points and (0, other) gives the forged third share.
    xs = {1: shares[1], 2: shares[2]}
    y = [int.from_bytes(xs[x], "big") for x in (1, 2)]
    s = int.from_bytes(other, "big")
    p = shamir.PRIME
    # f(x) = s + a x + b x^2 through (1, y1), (2, y2): solve for a, b, then f(3).
    b = ((y[1] - s) - 2 * (y[0] - s)) * pow(2, -1, p) % p
    a = (y[0] - s - b) % p
    third = (s + 3 * a + 9 * b) % p
    assert shamir.combine({**xs, 3: third.to_bytes(shamir.SHARE_BYTES, "big")}, 3, 32) == other
    assert forged  # (the split itself works for any secret)


def test_an_altered_share_rebuilds_another_secret_which_its_commitment_gives_away():
    shares = shamir.split(SECRET, [1, 2, 3], 2)
    with pytest.raises(shamir.ShareError):
        shamir.combine({1: shares[1], 2: b"\x00" * 5}, 2, 32)
    bad = (int.from_bytes(shares[2], "big") + 1).to_bytes(shamir.SHARE_BYTES, "big")
    try:
        rebuilt = shamir.combine({1: shares[1], 2: bad}, 2, 32)
    except shamir.ShareError:
        return
    assert rebuilt != SECRET and commitment(rebuilt, "r") != commitment(SECRET, "r")


def test_a_sealed_share_opens_only_for_its_round_and_pair():
    a, b = KeyPair(), KeyPair()
    key = a.agree(b.public, "share", "run/1.1")
    assert key == b.agree(a.public, "share", "run/1.1")
    nonce, sealed = seal(key, "run/1.1", 1, 2, b"secret share")
    assert open_sealed(key, "run/1.1", 1, 2, nonce, sealed) == b"secret share"
    for round_id, sender, receiver, blob in [
        ("run/2.1", 1, 2, sealed),  # replayed into another round
        ("run/1.1", 3, 2, sealed),  # claimed to be from another worker
        ("run/1.1", 1, 2, sealed[:-1] + bytes([sealed[-1] ^ 1])),  # one bit changed
    ]:
        with pytest.raises(SealedShareRefused, match="does not open"):
            open_sealed(key, round_id, sender, receiver, nonce, blob)
    assert b.agree(a.public, "share", "run/2.1") != key  # every round its own key


def test_no_private_key_shows_in_a_repr():
    pair = KeyPair()
    assert pair.private_bytes().hex() not in repr(pair) and pair.public.hex()[:16] in repr(pair)
    assert "seed" not in repr(MaskStream(b"s" * 32)) and b"s".hex() * 4 not in repr(MaskStream(b"s" * 32))


def test_n_workers_at_the_clipping_range_sum_without_wrapping():
    q = Quantizer(clip=0.5, workers=7, max_weight=100)
    rng = np.random.default_rng(0)
    for sign in (1, -1):
        total = np.zeros(3, dtype=np.uint32)
        for _ in range(7):
            coords, clipped = q.quantize(np.full(3, sign * 10.0), 100, rng)  # far past the range: clipped
            assert clipped == 3
            total += coords
        mean = q.mean_delta(total, 7 * 100)
        np.testing.assert_allclose(mean, sign * 0.5, rtol=1e-12)


def test_stochastic_rounding_is_unbiased_and_within_one_step():
    q = Quantizer(clip=1.0, workers=3, max_weight=1)
    rng = np.random.default_rng(1)
    x = np.full(200_000, 0.3 * q.step)  # a third of a step: rounds to 0 or 1 step
    coords, _ = q.quantize(x, 1, rng)
    back = q.mean_delta(coords, 1)
    assert set(np.unique(coords.view(np.int32))) == {0, 1}
    assert np.abs(back - x).max() < q.step
    assert abs(back.mean() - x.mean()) < 0.01 * q.step


def test_the_error_bound_holds_for_random_updates():
    q = Quantizer(clip=2.0, workers=5, max_weight=640)
    rng = np.random.default_rng(2)
    weights = [640, 320, 64, 500, 1]
    deltas = [rng.normal(0, 0.05, 10_000) for _ in weights]
    total = np.zeros(10_000, dtype=np.uint32)
    for d, w in zip(deltas, weights):
        total += q.quantize(d, w, rng)[0]
    exact = sum(w * d for d, w in zip(deltas, weights)) / sum(weights)
    error = np.abs(q.mean_delta(total, sum(weights)) - exact).max()
    assert 0 < error <= q.error_bound(5, sum(weights))


def test_a_range_that_would_wrap_is_refused():
    with pytest.raises(ValueError, match="would wrap"):
        Quantizer(clip=1.0, workers=1000, max_weight=10_000_000)
    with pytest.raises(ValueError, match="positive"):
        Quantizer(clip=float("nan"), workers=3, max_weight=1)


def test_a_mask_stream_is_the_same_however_it_is_cut():
    whole = MaskStream(b"k" * 32).next(1000)
    stream = MaskStream(b"k" * 32)
    assert np.array_equal(np.concatenate([stream.next(n) for n in (1, 15, 16, 300, 668)]), whole)
    assert not np.array_equal(MaskStream(b"j" * 32).next(1000), whole)
    pieces = [np.arange(5), np.arange(0), np.arange(7)]
    assert [len(c) for c in chunked(pieces, 4)] == [4, 4, 4]


@pytest.mark.parametrize("workers, survivors", [(3, 3), (5, 3), (10, 6), (100, 51)])
@pytest.mark.parametrize(
    "noise_multiplier, clip_norm, coordinates", [(0.5, 1.0, 431_080), (5.0, 0.01, 26_305_034), (2.0, 100.0, 23_000)]
)
def test_with_distributed_dp_the_sum_and_its_noise_fit_and_each_worker_s_noise_is_drawable(
    workers, survivors, noise_multiplier, clip_norm, coordinates
):
    """N workers at the edge of the range, plus the sum's noise out to TAIL deviations, stay within int32; no
    worker's noise deviation passes MAX_NOISE_STD, where numpy's Poisson draws keep their variance."""
    from fedpi.secagg.masks import LARGEST, MAX_NOISE_STD, TAIL, DistributedNoise

    noise = DistributedNoise(clip_norm, noise_multiplier, survivors, coordinates, count_stddev=1.0)
    q = Quantizer(clip=0.5, workers=workers, max_weight=1, noise=noise)
    sum_std = noise.sum_std(q.scale, workers) * q.scale
    assert workers * (q.bound + 1) + TAIL * sum_std <= LARGEST
    assert (2 * noise.skellam_mu(q.scale)) ** 0.5 <= MAX_NOISE_STD * (1 + 1e-9)
    k = noise.count_scale(workers)
    assert k % 2 == 0 and workers * k / 2 + TAIL * (2 * noise.count_mu(workers) * workers) ** 0.5 <= LARGEST
