"""One worker's side of secure aggregation (SecAgg+), without gRPC: the stages of one round, in order, each
checked against what the coordinator may ask. Its key pairs, seeds and the shares it holds live only here and in
no repr or log; the coordinator sees public keys, sealed shares, a masked update, and the shares that unmask a sum."""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from fedpi.secagg import OutOfOrder, keys, shamir
from fedpi.secagg.keys import KeyPair
from fedpi.secagg.masks import ELEMENT_BYTES, MaskStream, Quantizer, SignedMask, apply, chunked, pairwise_sign
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
    Quantizer(c.clip, c.workers, c.max_weight)  # raises ValueError on a range that would wrap


class Session:
    """Secure aggregation for one round_id: keys, then shares, then the masked update, then unmasking."""

    def __init__(self, config: pb.SecAggConfig):
        check_config(config)
        self.config = config
        self.round_id = config.round_id
        self.me = config.index
        self.neighbours = set(config.neighbours)
        self.quantizer = Quantizer(config.clip, config.workers, config.max_weight)
        self._cipher = KeyPair()
        self._mask = KeyPair()
        self._seed = secrets.token_bytes(SEED_BYTES)  # b_u: the self mask
        self._rounding = secrets.randbits(128)  # the same stochastic rounding on every fetch of the update
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

    def masked_update(
        self, peers: Iterable[int], deltas: Iterable[np.ndarray], weight: int, chunk_bytes: int
    ) -> Iterator[pb.MaskedChunk]:
        """Header, chunks (made as they are sent, from `deltas`: the float coordinates of trained minus set weights,
        in manifest order, in pieces of any size) and trailer. The same bytes on every call."""
        chosen = frozenset(peers)
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

    def _chunks(self, deltas: Iterable[np.ndarray], weight: int, elements: int) -> Iterator[pb.MaskedChunk]:
        rng = np.random.default_rng(self._rounding)
        masks = [SignedMask(MaskStream(self._seed), 1)] + [
            SignedMask(MaskStream(self._mask.agree(self._peers[v].mask_public_key, MASK, self.round_id)),
                       pairwise_sign(self.me, v))
            for v in sorted(self._masked_with or ())
        ]  # fmt: skip
        quantized = _Quantized(self.quantizer, deltas, weight, rng)
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
