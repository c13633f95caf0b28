"""One worker's side of secure aggregation (SecAgg+), without gRPC: the stages of one round, in order, each
checked against what the coordinator may ask. Its key pairs, seeds and the shares it holds live only here and in
no repr or log; the coordinator sees public keys, sealed shares, a masked update, and the shares that unmask a sum."""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from fedpi.secagg import OutOfOrder, keys, shamir
from fedpi.secagg.keys import KeyPair
from fedpi.secagg.masks import (
    ELEMENT_BYTES,
    DistributedNoise,
    MaskStream,
    Quantizer,
    SignedMask,
    apply,
    chunked,
    pairwise_sign,
    wrap,
)
from generated.fedpi.v1 import worker_pb2 as pb

SEED_BYTES = 32
SHARE = "share"
MASK = "pairwise mask"


def check_config(c: pb.SecAggConfig) -> None:
    neighbours = list(c.neighbours)
    if not c.round_id:
        raise ValueError("secure aggregation needs the round_id of the round whose update it masks")
    if not 1 <= c.index <= c.workers:
        raise ValueError(f"index {c.index} is outside 1..{c.workers}, the round's workers")
    if len(set(neighbours)) != len(neighbours) or c.index in neighbours:
        raise ValueError(f"neighbours must be distinct other workers, got {neighbours}")
    if any(not 1 <= n <= c.workers for n in neighbours):
        raise ValueError(f"neighbours must be numbered 1..{c.workers}, got {neighbours}")
    # The worker and its neighbours each hold a share of its secrets. A majority of them: a coordinator that told
    # some this worker survived and others that it dropped cannot collect enough shares of both (Bonawitz et al.
    # 2017, section 4).
    holders = len(neighbours) + 1
    if not holders // 2 < c.threshold <= holders:
        raise ValueError(
            f"threshold {c.threshold} must be a majority of the {holders} holders of a worker's shares, itself and "
            f"its {len(neighbours)} neighbours ({holders // 2 + 1}..{holders})"
        )
    quantizer(c)  # raises ValueError on a range that would wrap


def noise(c: pb.SecAggConfig) -> DistributedNoise | None:
    """Distributed DP's noise, if the config asks for it; ValueError if it asks for it wrongly."""
    if not c.dp_clip_norm:
        return None
    if not c.unweighted or c.max_weight != 1:
        raise ValueError("distributed DP weighs every worker alike: it needs unweighted and max_weight 1")
    if not 1 <= c.dp_survivors <= c.workers:
        raise ValueError(f"dp_survivors {c.dp_survivors} is outside 1..{c.workers}, the round's workers")
    return DistributedNoise(c.dp_clip_norm, c.dp_noise_multiplier, c.dp_survivors, c.coordinates, c.dp_count_stddev)


def quantizer(c: pb.SecAggConfig) -> Quantizer:
    return Quantizer(c.clip, c.workers, c.max_weight, noise(c))


class Session:
    """Secure aggregation for one round_id: keys, then shares, then the masked update, then unmasking."""

    def __init__(self, config: pb.SecAggConfig):
        check_config(config)
        self.config = config
        self.round_id = config.round_id
        self.me = config.index
        self.neighbours = set(config.neighbours)
        self.quantizer = quantizer(config)
        self._cipher = KeyPair()
        self._mask = KeyPair()
        self._seed = secrets.token_bytes(SEED_BYTES)  # b_u: the self mask
        # The same rounding and noise on every fetch of the update: two differently noised copies would average out.
        self._rounding = secrets.randbits(128)
        self._noise = (secrets.randbits(128), secrets.randbits(128))  # the Poisson draws added, and those taken away
        self._peers: dict[int, pb.PeerKeys] = {}  # neighbours this worker sent shares to
        self._own = b""  # its own share of both its secrets
        self._masked_with: frozenset[int] | None = None
        self._unmasked: tuple[tuple[frozenset[int], frozenset[int]], pb.SecAggUnmaskResponse] | None = None

    def __repr__(self) -> str:
        return f"Session(round_id={self.round_id!r}, index={self.me})"

    def check_round(self, round_id: str) -> None:
        if round_id != self.round_id:
            raise OutOfOrder(f"this worker's secure aggregation is for round id {self.round_id!r}, not {round_id!r}")

    # -- 1 and 2 -----------------------------------------------------------------------------------------------

    def public_keys(self) -> pb.SecAggKeysResponse:
        return pb.SecAggKeysResponse(
            round_id=self.round_id, cipher_public_key=self._cipher.public, mask_public_key=self._mask.public
        )

    def shares(self, peers: Sequence[pb.PeerKeys]) -> pb.SecAggSharesResponse:
        if self._peers:
            raise OutOfOrder(f"round id {self.round_id!r}: shares were already sent; a secret is shared once")
        indices = [p.index for p in peers]
        if len(set(indices)) != len(indices) or not set(indices) <= self.neighbours:
            raise ValueError(f"peers {indices} are not distinct neighbours of worker {self.me}")
        if len(indices) + 1 < self.config.threshold:
            raise OutOfOrder(
                f"{len(indices)} neighbours answered: with this worker, fewer than the threshold "
                f"{self.config.threshold}; their shares could never rebuild a secret"
            )
        for p in peers:
            if len(p.cipher_public_key) != keys.KEY_BYTES or len(p.mask_public_key) != keys.KEY_BYTES:
                raise ValueError(f"worker {p.index}'s public keys are not {keys.KEY_BYTES} bytes each")
        holders = [*indices, self.me]
        seed_shares = shamir.split(self._seed, holders, self.config.threshold)
        key_shares = shamir.split(self._mask.private_bytes(), holders, self.config.threshold)
        self._own = seed_shares[self.me] + key_shares[self.me]
        sealed = []
        for p in peers:
            key = self._cipher.agree(p.cipher_public_key, SHARE, self.round_id)
            nonce, ciphertext = keys.seal(
                key, self.round_id, self.me, p.index, seed_shares[p.index] + key_shares[p.index]
            )
            sealed.append(pb.SealedShare(sender=self.me, receiver=p.index, nonce=nonce, ciphertext=ciphertext))
        self._peers = {p.index: p for p in peers}
        return pb.SecAggSharesResponse(
            round_id=self.round_id, shares=sealed, self_mask_commitment=keys.commitment(self._seed, self.round_id)
        )

    # -- 3 -----------------------------------------------------------------------------------------------------

    def elements(self, coordinates: int) -> int:
        return self.quantizer.elements(coordinates)

    def masked_update(
        self,
        peers: Iterable[int],
        deltas: Callable[[], Iterable[np.ndarray]],
        coordinates: int,
        weight: int,
        chunk_bytes: int,
    ) -> Iterator[pb.MaskedChunk]:
        """Chunks (made as they are sent, from `deltas()`: the float coordinates of trained minus set weights, in
        manifest order, in pieces of any size; read twice with distributed DP, once for the norm) and trailer. The
        same bytes on every call."""
        chosen = frozenset(peers)
        noise = self.quantizer.noise
        if noise is not None and noise.coordinates != coordinates:
            raise ValueError(
                f"distributed DP was set up for {noise.coordinates} coordinates; this worker's model has {coordinates}"
            )
        if not self._peers:
            raise OutOfOrder(f"round id {self.round_id!r}: no shares were sent yet (SecAggShares comes first)")
        if not chosen <= set(self._peers):
            raise ValueError(f"peers {sorted(chosen - set(self._peers))} never received this worker's shares")
        if len(chosen) + 1 < self.config.threshold:
            raise OutOfOrder(
                f"{len(chosen)} peers and this worker are fewer than the threshold {self.config.threshold}"
            )
        if self._masked_with is not None and chosen != self._masked_with:
            raise OutOfOrder(
                f"round id {self.round_id!r}: this update was masked against workers {sorted(self._masked_with)}; "
                f"it is sent only so, never against another set"
            )
        if self._unmasked is not None:
            raise OutOfOrder(f"round id {self.round_id!r} was already unmasked; its update is not sent again")
        self._masked_with = chosen
        return self._chunks(deltas, 1 if self.config.unweighted else weight, max(chunk_bytes // ELEMENT_BYTES, 1))

    def _chunks(
        self, deltas: Callable[[], Iterable[np.ndarray]], weight: int, elements: int
    ) -> Iterator[pb.MaskedChunk]:
        rng = np.random.default_rng(self._rounding)
        masks = [SignedMask(MaskStream(self._seed), 1)] + [
            SignedMask(MaskStream(self._mask.agree(self._peers[v].mask_public_key, MASK, self.round_id)),
                       pairwise_sign(self.me, v))
            for v in sorted(self._masked_with or ())
        ]  # fmt: skip
        if self.quantizer.noise is None:
            quantized = _Quantized(self.quantizer, deltas(), weight, rng)
        else:
            quantized = _Noised(self.quantizer, self.quantizer.noise, deltas, rng, self._noise)
        offset = 0
        for chunk in chunked(quantized, elements):
            data = apply(chunk, masks).astype("<u4").tobytes()
            yield pb.MaskedChunk(data=pb.WeightsData(offset=offset, data=data))
            offset += len(data)
        yield pb.MaskedChunk(trailer=pb.MaskedUpdateTrailer(clipped=quantized.clipped))

    # -- 4 -----------------------------------------------------------------------------------------------------

    def unmask(self, request: pb.SecAggUnmaskRequest) -> pb.SecAggUnmaskResponse:
        survivors, dropped = frozenset(request.survivors), frozenset(request.dropped)
        if self._masked_with is None:
            raise OutOfOrder(f"round id {self.round_id!r}: this worker sent no masked update; it unmasks nothing")
        if self._unmasked is not None:
            if self._unmasked[0] == (survivors, dropped):
                return self._unmasked[1]  # the same answer again: a retried call
            raise OutOfOrder(f"round id {self.round_id!r} was already unmasked with other survivors and dropouts")
        if survivors & dropped:
            raise OutOfOrder(f"workers {sorted(survivors & dropped)} cannot both have survived and dropped")
        if not (survivors | dropped) <= set(self._peers):
            raise ValueError(f"workers {sorted((survivors | dropped) - set(self._peers))} are not this worker's peers")
        if len(survivors) + 1 < self.config.threshold:  # itself: it answers, so its update was summed
            raise OutOfOrder(
                f"{len(survivors) + 1} survivors among this worker and its neighbours, fewer than the threshold "
                f"{self.config.threshold}: nothing is revealed"
            )
        noise = self.quantizer.noise
        if (
            noise is not None
            and len(self.neighbours) == self.config.workers - 1
            and len(survivors) + 1 < noise.survivors
        ):
            # With every worker a neighbour, the survivors named are the whole sum (naming one that sent nothing
            # would leave its masks in it): a sum of fewer than the noise was split among is not unmasked.
            raise OutOfOrder(
                f"{len(survivors) + 1} updates in the sum, fewer than the {noise.survivors} that distributed DP split "
                f"its noise among: nothing is revealed"
            )
        held = self._open(request.shares, survivors | dropped)
        held[self.me] = self._own
        response = pb.SecAggUnmaskResponse(round_id=self.round_id)
        for v in sorted(survivors | {self.me}):
            response.self_mask_shares.add(owner=v, share=held[v][: shamir.SHARE_BYTES])
        for v in sorted(dropped):
            response.mask_key_shares.add(owner=v, share=held[v][shamir.SHARE_BYTES :])
        self._unmasked = ((survivors, dropped), response)
        return response

    def _open(self, sealed: Sequence[pb.SealedShare], owners: frozenset[int]) -> dict[int, bytes]:
        held: dict[int, bytes] = {}
        for s in sealed:
            if s.receiver != self.me or s.sender not in self._peers or s.sender in held:
                raise ValueError(
                    f"a share from worker {s.sender} to worker {s.receiver} is not one worker {self.me} holds"
                )
            key = self._cipher.agree(self._peers[s.sender].cipher_public_key, SHARE, self.round_id)
            plain = keys.open_sealed(key, self.round_id, s.sender, s.receiver, s.nonce, s.ciphertext)
            if len(plain) != 2 * shamir.SHARE_BYTES:
                raise ValueError(
                    f"the share from worker {s.sender} is {len(plain)} bytes, not {2 * shamir.SHARE_BYTES}"
                )
            held[s.sender] = plain
        missing = owners - set(held)
        if missing:
            raise ValueError(f"no sealed share from workers {sorted(missing)} came with the request")
        return held


class _Quantized:
    """An update's quantised pieces, then its weight element; counts the coordinates clipped on the way."""

    def __init__(self, quantizer: Quantizer, deltas: Iterable[np.ndarray], weight: int, rng: np.random.Generator):
        self.quantizer, self.deltas, self.weight, self.rng = quantizer, deltas, weight, rng
        self.clipped = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        for d in self.deltas:
            coordinates, clipped = self.quantizer.quantize(d, self.weight, self.rng)
            self.clipped += clipped
            yield coordinates
        yield self.quantizer.weight_element(self.weight)


class _Noised(_Quantized):
    """Distributed DP: the update clipped to the clip norm as a whole, quantised, each integer noised; then adaptive
    clipping's noised count if asked for, then the weight (1)."""

    def __init__(
        self,
        quantizer: Quantizer,
        noise: DistributedNoise,
        deltas: Callable[[], Iterable[np.ndarray]],
        rng: np.random.Generator,
        seeds: tuple[int, int],
    ):
        super().__init__(quantizer, (), 1, rng)
        self.noise, self.make_deltas, self.seeds = noise, deltas, seeds

    def __iter__(self) -> Iterator[np.ndarray]:
        norm = math.sqrt(sum(float(np.dot(d, d)) for d in self.make_deltas()))
        within = norm <= self.noise.clip_norm
        factor = 1.0 if within else (self.noise.clip_norm / norm if math.isfinite(norm) else 0.0)
        added, taken = (np.random.default_rng(seed) for seed in self.seeds)

        def noised(values: np.ndarray, mu: float) -> np.ndarray:
            # separate streams for the two Poisson draws: the same noise however the update is cut into pieces
            return wrap(values + (added.poisson(mu, len(values)) - taken.poisson(mu, len(values))))

        mu = self.noise.skellam_mu(self.quantizer.scale)
        for d in self.make_deltas():
            coordinates, clipped = self.quantizer.quantize(d, 1, self.rng, factor)
            self.clipped += clipped
            yield noised(coordinates.view(np.int32).astype(np.int64), mu)
        if self.noise.count_stddev:
            k = self.noise.count_scale(self.quantizer.workers)
            count = np.array([k // 2 if within else -(k // 2)], dtype=np.int64)
            yield noised(count, self.noise.count_mu(self.quantizer.workers))
        yield self.quantizer.weight_element(1)
