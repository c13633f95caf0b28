"""A worker's side of secure aggregation, several sessions in one process standing in for a round's workers: what
the coordinator receives is independent of the update, the masks cancel in the sum, and every stage refuses what
would reveal more than the protocol allows."""

from __future__ import annotations

import numpy as np
import pytest

from fedpi.secagg import OutOfOrder, shamir
from fedpi.secagg.keys import SealedShareRefused
from fedpi.secagg.masks import MaskStream, Quantizer
from generated.fedpi.v1 import worker_pb2 as pb
from worker_service.secagg import Session

N, WEIGHT, CLIP = 4, 10, 1.0
DELTA = np.random.default_rng(7).normal(0, 0.01, 5000)
DP = dict(unweighted=True, max_weight=1, dp_clip_norm=0.5, dp_noise_multiplier=1.0, dp_survivors=3, coordinates=5000)


def config(i: int, round_id: str = "run/1.1", threshold: int = 3, **kw) -> pb.SecAggConfig:
    fields = dict(round_id=round_id, index=i, neighbours=[j for j in range(1, N + 1) if j != i], threshold=threshold,
                  clip=CLIP, workers=N, max_weight=WEIGHT)  # fmt: skip
    return pb.SecAggConfig(**{**fields, **kw})


def set_up(round_id: str = "run/1.1", **kw) -> tuple[dict[int, Session], dict[int, list[pb.SealedShare]]]:
    sessions = {i: Session(config(i, round_id, **kw)) for i in range(1, N + 1)}
    keys = {i: s.public_keys() for i, s in sessions.items()}
    sealed: dict[int, list[pb.SealedShare]] = {}
    for i, s in sessions.items():
        peers = [
            pb.PeerKeys(index=j, cipher_public_key=k.cipher_public_key, mask_public_key=k.mask_public_key)
            for j, k in keys.items()
            if j != i
        ]
        for share in s.shares(peers).shares:
            sealed.setdefault(share.receiver, []).append(share)
    return sessions, sealed


def fetch(session: Session, delta=DELTA, chunk_bytes: int = 4096, peers=None, weight: int = WEIGHT) -> np.ndarray:
    peers = [j for j in range(1, N + 1) if j != session.me] if peers is None else peers
    chunks = session.masked_update(peers, lambda: [delta[:1234], delta[1234:]], len(delta), weight, chunk_bytes)
    return np.concatenate([np.frombuffer(c.data.data, "<u4") for c in chunks if c.WhichOneof("kind") == "data"])


def plain(delta=DELTA) -> np.ndarray:
    coords, _ = Quantizer(CLIP, N, WEIGHT).quantize(delta, WEIGHT, np.random.default_rng(0))
    return np.concatenate([coords, [WEIGHT]]).astype(np.uint32)


def unmask_request(i: int, sealed, survivors, dropped=(), round_id="run/1.1") -> pb.SecAggUnmaskRequest:
    owners = set(survivors) | set(dropped)
    shares = [s for s in sealed[i] if s.sender in owners]
    return pb.SecAggUnmaskRequest(round_id=round_id, survivors=survivors, dropped=dropped, shares=shares)


def uniform(values: np.ndarray) -> bool:
    """The top four bits fall evenly into 16 bins (chi-square, 15 degrees of freedom, p < 1e-6 fails)."""
    counts = np.bincount(values >> 28, minlength=16)
    expected = len(values) / 16
    return float(((counts - expected) ** 2 / expected).sum()) < 50.0


def test_what_the_coordinator_receives_is_independent_of_the_update():
    sessions, _ = set_up()
    masked = fetch(sessions[1])
    q = plain().astype(np.int64)
    assert uniform(masked) and not uniform(plain())  # the plain update sits near 0 (and near 2^32)
    r = np.corrcoef(masked.astype(np.float64), q.view(np.int64).astype(np.float64))[0, 1]
    assert abs(r) < 4 / np.sqrt(len(q))
    # Masks are never reused: not across workers of a round (same update, different bytes, uniform difference) ...
    assert uniform(masked - fetch(sessions[2]))
    # ... nor by one worker across rounds.
    again, _ = set_up("run/2.1")
    assert uniform(masked - fetch(again[1]))


def test_the_masks_cancel_in_the_sum_once_the_self_masks_are_rebuilt_from_shares():
    sessions, sealed = set_up()
    updates = {i: np.random.default_rng(i).normal(0, 0.01, len(DELTA)) for i in sessions}
    total = sum((fetch(s, updates[i]) for i, s in sessions.items()), np.zeros(len(DELTA) + 1, np.uint32))
    everyone = list(range(1, N + 1))
    answers = {i: s.unmask(unmask_request(i, sealed, [j for j in everyone if j != i])) for i, s in sessions.items()}
    for owner in everyone:
        held = {holder: r.share for holder, a in answers.items() for r in a.self_mask_shares if r.owner == owner}
        assert len(held) == N  # itself and its three neighbours
        total -= MaskStream(shamir.combine(held, 3, 32)).next(len(total))
    q = Quantizer(CLIP, N, WEIGHT)
    assert int(total[-1]) == N * WEIGHT
    exact = sum(updates.values()) / N
    assert np.abs(q.mean_delta(total[:-1], N * WEIGHT) - exact).max() <= q.error_bound(N, N * WEIGHT)


def test_the_update_is_the_same_bytes_on_every_fetch_and_only_against_one_peer_set():
    sessions, _ = set_up()
    first = fetch(sessions[1], chunk_bytes=4096)
    assert np.array_equal(first, fetch(sessions[1], chunk_bytes=12))  # the same rounding and masks
    with pytest.raises(OutOfOrder, match="only so"):
        fetch(sessions[1], peers=[2, 3])


def test_a_tampered_replayed_or_misaddressed_share_is_refused():
    sessions, sealed = set_up()
    fetch(sessions[1])
    tampered = [pb.SealedShare(sender=s.sender, receiver=s.receiver, nonce=s.nonce, ciphertext=s.ciphertext[:-1]
                               + bytes([s.ciphertext[-1] ^ 1])) if s.sender == 2 else s for s in sealed[1]]  # fmt: skip
    request = pb.SecAggUnmaskRequest(round_id="run/1.1", survivors=[2, 3, 4], shares=tampered)
    with pytest.raises(SealedShareRefused, match="from worker 2 to worker 1 does not open"):
        sessions[1].unmask(request)
    _, old = set_up("run/0.1")  # last round's share from worker 2, replayed
    replayed = [s for s in sealed[1] if s.sender != 2] + [s for s in old[1] if s.sender == 2]
    with pytest.raises(SealedShareRefused):
        sessions[1].unmask(pb.SecAggUnmaskRequest(round_id="run/1.1", survivors=[2, 3, 4], shares=replayed))
    with pytest.raises(ValueError, match="not one worker 1 holds"):
        sessions[1].unmask(pb.SecAggUnmaskRequest(round_id="run/1.1", survivors=[2, 3, 4], shares=sealed[2]))


def test_a_worker_never_reveals_both_secrets_of_one_peer_nor_unmasks_twice_differently():
    sessions, sealed = set_up()
    fetch(sessions[1])
    with pytest.raises(OutOfOrder, match="both have survived and dropped"):
        sessions[1].unmask(pb.SecAggUnmaskRequest(round_id="run/1.1", survivors=[2, 3], dropped=[3], shares=sealed[1]))
    first = sessions[1].unmask(unmask_request(1, sealed, [2, 3], [4]))
    assert sorted(r.owner for r in first.self_mask_shares) == [1, 2, 3]
    assert [r.owner for r in first.mask_key_shares] == [4]
    assert sessions[1].unmask(unmask_request(1, sealed, [2, 3], [4])) == first  # a retried call
    with pytest.raises(OutOfOrder, match="already unmasked"):
        sessions[1].unmask(unmask_request(1, sealed, [2, 3, 4]))
    with pytest.raises(OutOfOrder, match="not sent again"):
        fetch(sessions[1])


def test_a_claim_of_too_few_survivors_reveals_nothing():
    sessions, sealed = set_up()
    fetch(sessions[1])
    with pytest.raises(OutOfOrder, match="fewer than the threshold 3"):
        sessions[1].unmask(unmask_request(1, sealed, [2], [3, 4]))


def test_with_distributed_dp_and_every_worker_a_neighbour_no_sum_of_fewer_than_the_noise_was_split_among_is_unmasked():
    """The coordinator named 4 workers to split the noise among; a sum of 3 would carry 3/4 of it."""
    sessions, sealed = set_up(**{**DP, "dp_survivors": 4})
    fetch(sessions[1], weight=1)
    with pytest.raises(OutOfOrder, match="3 updates in the sum, fewer than the 4 that distributed DP split"):
        sessions[1].unmask(unmask_request(1, sealed, [2, 3], [4]))
    sessions, sealed = set_up(**{**DP, "dp_survivors": 3})
    fetch(sessions[1], weight=1)
    assert sessions[1].unmask(unmask_request(1, sealed, [2, 3], [4])).self_mask_shares


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(threshold=2), "must be a majority of the 4 holders"),
        (dict(index=0), "outside 1..4"),
        (dict(neighbours=[1, 2]), "distinct other workers"),
        (dict(round_id=""), "needs the round_id"),
        (dict(clip=0.0), "positive number"),
        (dict(DP, max_weight=10), "weighs every worker alike"),
        (dict(DP, dp_survivors=5), "outside 1..4"),
        (dict(DP, dp_noise_multiplier=0.0), "positive clip norm and noise multiplier"),
        (dict(DP, dp_noise_multiplier=1e9), "too large for 5000 coordinates"),
        (dict(DP, dp_clip_norm=float("nan")), "positive clip norm and noise multiplier"),
        (dict(DP, dp_clip_norm=-1.0), "positive clip norm and noise multiplier"),
        (dict(DP, dp_count_stddev=-1.0), "count_stddev >= 0"),
        (dict(DP, dp_count_stddev=float("inf")), "count_stddev >= 0"),
        (dict(DP, coordinates=-5), "coordinates >= 0"),
    ],
)
def test_a_config_that_would_weaken_the_protocol_is_refused(change, message):
    with pytest.raises(ValueError, match=message):
        Session(config(1, **change))


def test_no_secret_is_in_the_session_s_repr():
    sessions, _ = set_up()
    text = repr(sessions[1])
    assert sessions[1]._seed.hex() not in text and "run/1.1" in text


def test_with_distributed_dp_the_noised_update_is_the_same_bytes_however_it_is_cut_and_fetched():
    """Two differently noised copies of one update would average the noise away."""
    session = Session(config(1, **DP))
    peers = [2, 3, 4]
    s = set_up()  # keys for the peers
    keys = {i: x.public_keys() for i, x in s[0].items()}
    session.shares([pb.PeerKeys(index=j, cipher_public_key=keys[j].cipher_public_key,
                                mask_public_key=keys[j].mask_public_key) for j in peers])  # fmt: skip

    def fetch_dp(chunk_bytes, pieces):
        chunks = session.masked_update(peers, lambda: np.array_split(DELTA, pieces), len(DELTA), 1, chunk_bytes)
        return np.concatenate([np.frombuffer(c.data.data, "<u4") for c in chunks if c.WhichOneof("kind") == "data"])

    first = fetch_dp(4096, 2)
    assert len(first) == 5000 + 1
    assert np.array_equal(first, fetch_dp(12, 7))
    with pytest.raises(ValueError, match="set up for 5000 coordinates; this worker's model has 4999"):
        session.masked_update(peers, lambda: [DELTA[1:]], 4999, 1, 4096)
