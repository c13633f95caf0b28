"""Secure aggregation on the coordinator (SecAgg+, Bell et al. 2020; SecAgg when every worker is a neighbour): set
up the round's keys and relay the sealed shares, fold masked updates into a sum modulo 2^32 as they stream in, then
collect the shares that remove the masks and decode the weighted mean update. The coordinator never holds a key
that opens a share, and sees no update but the sum: its memory is the sum (4 bytes a parameter) and a chunk a
stream, however many workers report."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import structlog
import torch

from coordinator_service.engine.state import Contribution, RoundFailed, RoundState
from coordinator_service.engine.worker_client import WorkerClient
from coordinator_service.engine.worker_errors import WorkerError, WorkerRejected
from coordinator_service.policy.privacy import GaussianMean
from coordinator_service.policy.strategy import Failure
from fedpi.secagg import shamir
from fedpi.secagg.keys import KeyPair, commitment
from fedpi.secagg.masks import (
    ELEMENT_BYTES,
    TAIL,
    DistributedNoise,
    MaskStream,
    Quantizer,
    SignedMask,
    apply,
    pairwise_sign,
)
from fedpi.weights.manifest import TensorMeta
from generated.fedpi.v1 import worker_pb2 as pb

log = structlog.get_logger()

PHASE = "secure aggregation"
MIN_WORKERS = 3  # with two, each learns the other's update from the sum
UNMASK_CHUNK = 1 << 18  # elements unmasked at a time


@dataclass(frozen=True)
class SecureSettings:
    neighbours: int = 0  # k of SecAgg+: each worker shares with and masks against k others; 0 = all (SecAgg)
    threshold: int = 0  # shares that rebuild a secret; 0 = the smallest majority of a worker and its neighbours
    clip: float = 1.0  # each coordinate of a weighted update is clipped to [-clip, clip]
    chunk_bytes: int = 1 << 20

    def degree(self, workers: int) -> int:
        return workers - 1 if not self.neighbours or self.neighbours >= workers - 1 else self.neighbours

    def threshold_for(self, degree: int) -> int:
        return self.threshold or (degree + 1) // 2 + 1


def neighbour_graph(workers: int, degree: int) -> dict[int, set[int]]:
    """Workers 1..n on a ring in a random order, each joined to the degree/2 nearest on either side (a Harary graph
    with shuffled labels, as in SecAgg+); degree n - 1 joins everyone."""
    order = list(range(1, workers + 1))
    secrets.SystemRandom().shuffle(order)
    graph: dict[int, set[int]] = {i: set() for i in order}
    if degree >= workers - 1:
        return {i: set(order) - {i} for i in order}
    for position, i in enumerate(order):
        for step in range(1, degree // 2 + 1):
            j = order[(position + step) % workers]
            graph[i].add(j)
            graph[j].add(i)
    return graph


class SecureRound:
    """One round's secure aggregation. Workers are numbered 1..N in the round's order."""

    def __init__(
        self,
        settings: SecureSettings,
        rnd: RoundState,
        clients: Sequence[WorkerClient],
        max_weight: int,
        unweighted: bool,
        dp: GaussianMean | None = None,
        survivors: int = MIN_WORKERS,
    ):
        """With `dp`, distributed DP: every worker noises its own update, 1 / `survivors` of the noise each, and no
        sum of fewer than `survivors` updates is unmasked."""
        if len(clients) < MIN_WORKERS:
            raise RoundFailed(
                f"round {rnd.number}: secure aggregation needs at least {MIN_WORKERS} workers in a round, "
                f"{len(clients)} are here: with fewer, the sum gives a worker's update away"
            )
        self.settings, self.rnd, self.unweighted = settings, rnd, unweighted
        self.clients = {i + 1: c for i, c in enumerate(clients)}
        self.index = {c.name: i for i, c in self.clients.items()}
        degree = settings.degree(len(clients))
        self.threshold = settings.threshold_for(degree)
        holders = degree + 1  # a worker and its neighbours hold the shares of its secrets
        if not holders // 2 < self.threshold <= holders:
            raise RoundFailed(
                f"round {rnd.number}: --secagg-threshold {self.threshold} must be a majority of the {holders} "
                f"holders of a worker's shares, itself and its {degree} neighbours ({holders // 2 + 1}..{holders})"
            )
        self.graph = neighbour_graph(len(clients), degree)
        self.coordinates = sum(m.numel for m in rnd.payload.manifest if masked(m))
        self.dp, self.noise = dp, None
        if dp is not None:
            count_stddev = dp.adaptive.count_stddev if dp.adaptive is not None else 0.0
            survivors = min(max(survivors, MIN_WORKERS), len(clients))
            self.noise = DistributedNoise(dp.clip, dp.sum_noise_multiplier, survivors, self.coordinates, count_stddev)
        self.quantizer = Quantizer(settings.clip, len(clients), max_weight, self.noise)
        self.elements = self.quantizer.elements(self.coordinates)
        self.keys: dict[int, pb.SecAggKeysResponse] = {}
        self.sealed: dict[int, list[pb.SealedShare]] = {}  # by receiver
        self.shared: set[int] = set()
        self.commitments: dict[int, bytes] = {}
        self.sum = np.zeros(self.elements, dtype=np.uint32)
        self.clipped = 0
        self.error_bound = 0.0
        self.mean_distance = 0.0
        self.recovered: list[str] = []  # dropped after sharing: their pairwise masks rebuilt from shares

    def config(self, i: int) -> pb.SecAggConfig:
        config = pb.SecAggConfig(
            round_id=self.rnd.round_id,
            index=i,
            neighbours=sorted(self.graph[i]),
            threshold=self.threshold,
            clip=self.settings.clip,
            workers=len(self.clients),
            max_weight=self.quantizer.max_weight,
            unweighted=self.unweighted,
        )
        if (noise := self.noise) is not None:
            config.dp_clip_norm, config.dp_noise_multiplier = noise.clip_norm, noise.noise_multiplier
            config.dp_survivors, config.coordinates = noise.survivors, noise.coordinates
            config.dp_count_stddev = noise.count_stddev
        return config

    def takes_part(self, client: WorkerClient) -> bool:
        return self.index.get(client.name) in self.shared

    def peers(self, i: int) -> list[int]:
        """Whom worker i masks against: its neighbours that sent their shares."""
        return sorted(self.graph[i] & self.shared)

    def summary(self) -> dict:
        """For the round event: the graph, what was recovered, and how far rounding may have moved the mean."""
        return {
            "workers": len(self.clients),
            "neighbours": self.settings.degree(len(self.clients)),
            "threshold": self.threshold,
            "clip": self.settings.clip,
            "dropped_after_sharing": self.recovered,
            "clipped_coordinates": self.clipped,
            "quantization_error_bound": float(f"{self.error_bound:.3g}"),
            "mean_update_distance": round(self.mean_distance, 4),
        }

    # -- before training: keys, then shares ---------------------------------------------------------------------

    async def setup(self) -> list[Failure]:
        """Keys from every worker, then shares from those whose neighbours answered; who could not take part, why."""
        left_out: list[Failure] = []
        answers = await asyncio.gather(
            *(c.secagg_keys(self.config(i)) for i, c in self.clients.items()), return_exceptions=True
        )
        for (i, c), answer in zip(self.clients.items(), answers):
            if isinstance(answer, BaseException):
                left_out.append(Failure(c.name, PHASE, f"SecAggKeys: {reason(answer)}"))
            elif answer.round_id != self.rnd.round_id:
                left_out.append(Failure(c.name, PHASE, f"SecAggKeys answered for round id {answer.round_id!r}"))
            else:
                self.keys[i] = answer
        asked = [i for i in self.keys if len(self.graph[i] & set(self.keys)) + 1 >= self.threshold]
        shared = await asyncio.gather(*(self._shares(i) for i in asked), return_exceptions=True)
        for i, sealed in zip(asked, shared):
            if isinstance(sealed, BaseException):
                left_out.append(Failure(self.clients[i].name, PHASE, f"SecAggShares: {reason(sealed)}"))
            else:
                self.shared.add(i)
                for s in sealed:
                    self.sealed.setdefault(s.receiver, []).append(s)
        for i in sorted(self.keys.keys() - set(asked)):
            left_out.append(Failure(self.clients[i].name, PHASE, self._too_few(i, "answered SecAggKeys")))
        while short := [i for i in sorted(self.shared) if len(self.peers(i)) + 1 < self.threshold]:
            # each one left out may leave a neighbour short in turn
            for i in short:
                left_out.append(Failure(self.clients[i].name, PHASE, self._too_few(i, "sent their shares")))
            self.shared -= set(short)
        log.info(
            "secagg_set_up",
            workers=len(self.clients),
            neighbours=self.settings.degree(len(self.clients)),
            threshold=self.threshold,
            taking_part=len(self.shared),
        )
        return left_out

    def _too_few(self, i: int, did: str) -> str:
        return f"with it, fewer than the threshold of {self.threshold} of its neighbours {did}; it sits this round out"

    async def _shares(self, i: int) -> list[pb.SealedShare]:
        peers = [
            pb.PeerKeys(index=j, cipher_public_key=k.cipher_public_key, mask_public_key=k.mask_public_key)
            for j in sorted(self.graph[i])
            if (k := self.keys.get(j)) is not None
        ]
        client = self.clients[i]
        answer = await client.secagg_shares(pb.SecAggSharesRequest(round_id=self.rnd.round_id, peers=peers))
        expected = {p.index for p in peers}
        if answer.round_id != self.rnd.round_id or sorted(s.receiver for s in answer.shares) != sorted(expected):
            raise WorkerRejected(client.name, "SecAggShares did not answer with one share for each of its peers")
        if any(s.sender != i for s in answer.shares):
            raise WorkerRejected(client.name, f"SecAggShares sent shares in another worker's name than its own ({i})")
        self.commitments[i] = answer.self_mask_commitment
        return list(answer.shares)

    # -- after training: masked updates into the sum ------------------------------------------------------------

    async def fold(self, c: Contribution) -> None:
        """Stream worker c's masked update into the sum, chunk by chunk, checking the stream's shape as it goes."""
        i = self.index[c.name]
        total = self.elements * ELEMENT_BYTES
        request = pb.GetMaskedUpdateRequest(
            round_id=self.rnd.round_id, peers=self.peers(i), chunk_size=self.settings.chunk_bytes
        )
        offset, header, trailer = 0, None, None
        async for chunk in c.client.get_masked_update(request, total):
            kind = chunk.WhichOneof("kind")
            if kind == "header" and header is None and offset == 0:
                header = chunk.header
                if header.round_id != self.rnd.round_id or header.elements != self.elements:
                    raise WorkerRejected(
                        c.name,
                        f"its masked update is {header.elements} elements of round id {header.round_id!r}; "
                        f"expected {self.elements} of {self.rnd.round_id!r}",
                    )
            elif kind == "data" and header is not None and trailer is None:
                data = chunk.data
                if data.offset != offset or len(data.data) % ELEMENT_BYTES or offset + len(data.data) > total:
                    raise WorkerRejected(c.name, f"its masked update's chunk at byte {data.offset} is out of place")
                start = offset // ELEMENT_BYTES
                values = np.frombuffer(data.data, dtype="<u4")
                self.sum[start : start + len(values)] += values
                offset += len(data.data)
                c.stats.bytes_received += len(data.data)
            elif kind == "trailer" and header is not None and offset == total:
                trailer = chunk.trailer
            else:
                raise WorkerRejected(c.name, f"its masked update stream has a {kind} where none belongs")
        if trailer is None:
            raise WorkerRejected(c.name, f"its masked update ended after {offset} of {total} bytes")
        if trailer.clipped:
            self.clipped += trailer.clipped
            log.info("secagg_clipped", worker=c.name, coordinates=trailer.clipped, clip=self.settings.clip)

    async def refold(self, done: list[Contribution]) -> list[tuple[Contribution, BaseException]]:
        """The sum again from the updates that arrived whole (a broken stream left part of one in it): the same
        bytes, as a worker masks and rounds its update once. Returns who failed this time."""
        log.warning("aggregation_restarted", workers=[c.name for c in done])
        self.sum = np.zeros_like(self.sum)
        self.clipped = 0
        outcomes = await asyncio.gather(*(self.fold(c) for c in done), return_exceptions=True)
        return [(c, o) for c, o in zip(done, outcomes) if isinstance(o, BaseException)]

    # -- unmasking -----------------------------------------------------------------------------------------------

    async def unmask(self, done: Sequence[Contribution]) -> list[torch.Tensor]:
        """The weighted mean of the summed updates, as new weights in manifest order."""
        survivors = {self.index[c.name] for c in done}
        dropped = self.shared - survivors
        if len(survivors) < self.threshold:
            raise RoundFailed(
                f"round {self.rnd.number}: {len(survivors)} masked updates arrived, fewer than the secure "
                f"aggregation threshold {self.threshold}: the sum cannot be unmasked; the global model is unchanged",
                self.rnd.report.failures,
            )
        if self.noise is not None and len(survivors) < self.noise.survivors:
            raise RoundFailed(
                f"round {self.rnd.number}: {len(survivors)} masked updates arrived; distributed DP noises a sum only "
                f"when at least {self.noise.survivors} are in it (the quorum): the sum is not unmasked; the global "
                f"model is unchanged",
                self.rnd.report.failures,
            )
        answers = await asyncio.gather(
            *(self._reveal(i, survivors, dropped) for i in sorted(survivors)), return_exceptions=True
        )
        seeds: dict[int, dict[int, bytes]] = {}
        mask_keys: dict[int, dict[int, bytes]] = {}
        for holder, answer in zip(sorted(survivors), answers):
            if isinstance(answer, BaseException):
                log.warning("secagg_unmask_missing", worker=self.clients[holder].name, reason=reason(answer))
                continue
            for r in answer.self_mask_shares:
                seeds.setdefault(r.owner, {})[holder] = r.share
            for r in answer.mask_key_shares:
                mask_keys.setdefault(r.owner, {})[holder] = r.share
        masks = []
        for v in sorted(survivors):
            seed = self._rebuild(seeds, v, "self-mask seed")
            if commitment(seed, self.rnd.round_id) != self.commitments[v]:
                raise self._failed(f"the shares of worker {self.clients[v].name}'s self-mask seed do not rebuild it")
            masks.append(SignedMask(MaskStream(seed), -1))
        for v in sorted(dropped):
            pair = KeyPair.from_private_bytes(self._rebuild(mask_keys, v, "mask key"))
            if pair.public != self.keys[v].mask_public_key:
                raise self._failed(f"the shares of worker {self.clients[v].name}'s mask key do not rebuild it")
            for u in sorted(self.graph[v] & survivors):
                seed = pair.agree(self.keys[u].mask_public_key, "pairwise mask", self.rnd.round_id)
                masks.append(SignedMask(MaskStream(seed), -pairwise_sign(u, v)))
        for start in range(0, len(self.sum), UNMASK_CHUNK):
            self.sum[start : start + UNMASK_CHUNK] = apply(self.sum[start : start + UNMASK_CHUNK], masks)
        self.recovered = [self.clients[v].name for v in sorted(dropped)]
        log.info("secagg_unmasked", survivors=len(survivors), dropped=len(dropped), masks=len(masks))
        return self._decode(done)

    async def _reveal(self, i: int, survivors: set[int], dropped: set[int]) -> pb.SecAggUnmaskResponse:
        mine = self.graph[i]
        request = pb.SecAggUnmaskRequest(
            round_id=self.rnd.round_id,
            survivors=sorted(mine & survivors),
            dropped=sorted(mine & dropped),
            shares=[s for s in self.sealed.get(i, []) if s.sender in mine & (survivors | dropped)],
        )
        return await self.clients[i].secagg_unmask(request)

    def _rebuild(self, shares: dict[int, dict[int, bytes]], owner: int, what: str) -> bytes:
        held = shares.get(owner, {})
        if len(held) < self.threshold:
            raise self._failed(
                f"{len(held)} of the {self.threshold} shares of worker {self.clients[owner].name}'s {what} "
                f"arrived: the sum cannot be unmasked"
            )
        try:
            return shamir.combine(held, self.threshold, 32)
        except shamir.ShareError as exc:
            raise self._failed(f"worker {self.clients[owner].name}'s {what}: {exc}") from None

    def _noised_mean(self, survivors: int) -> tuple[np.ndarray, float]:
        """Distributed DP's mean, (sum of clipped updates + noise) / workers per round as the DP mean divides, and how
        far from the global model it can honestly be: the clipped updates, the noise's norm out to its tail, and the
        rounding. Adaptive clipping learns from the noised count."""
        assert self.noise is not None and self.dp is not None
        scale, expected = self.quantizer.scale, self.dp.expected_workers
        coordinates = self.sum[: self.coordinates].view(np.int32).astype(np.float64)
        mean = coordinates / (scale * expected)
        std = self.noise.sum_std(scale, survivors) / expected
        rounding = survivors * np.sqrt(self.coordinates) / (scale * expected)
        bound = self.noise.clip_norm * survivors / expected + std * (np.sqrt(self.coordinates) + TAIL) + rounding
        count = None
        if self.noise.count_stddev:
            count = int(self.sum[-2:-1].view(np.int32)[0]) / self.noise.count_scale(self.quantizer.workers)
        self.dp.clipped(self.noise.clip_norm, None, survivors, count, noise_std=std)
        return mean, bound

    def _failed(self, message: str) -> RoundFailed:
        return RoundFailed(
            f"round {self.rnd.number}: {message}; the global model is unchanged", self.rnd.report.failures
        )

    def _decode(self, done: Sequence[Contribution]) -> list[torch.Tensor]:
        """The mean update, checked as far as a sum can be: its total weight against the weights the workers reported
        in the clear, and its distance from the global model against the distance bound (which one update can no
        longer be held to)."""
        total_weight = int(self.sum[-1:].view(np.int32)[0])
        reported = sum(1 if self.unweighted else c.result.samples for c in done)
        if total_weight != reported:
            raise self._failed(
                f"the unmasked total weight is {total_weight}, not the {reported} the workers reported: an update "
                f"or a share was altered"
            )
        if self.noise is None:
            mean = self.quantizer.mean_delta(self.sum[:-1], total_weight)
            bound = self.rnd.max_distance
        else:
            mean, bound = self._noised_mean(total_weight)
        distance = float(np.sqrt(np.dot(mean, mean)))
        if not distance <= bound:
            raise self._failed(
                f"the round's mean update is {distance:.4g} from the global model, beyond the bound {bound:.4g} "
                f"({'the clip norm and the noise' if self.noise else '--max-update-ratio'}): a worker sent integers "
                f"outside the range"
            )
        self.mean_distance = distance
        flat, start = [], 0
        for meta, reference in zip(self.rnd.payload.manifest, self.rnd.reference):
            if not masked(meta):  # integer, bool and complex tensors keep the global model's values
                flat.append(reference.to(torch.complex128 if reference.is_complex() else torch.float64))
                continue
            flat.append(reference.double() + torch.from_numpy(mean[start : start + meta.numel]))
            start += meta.numel
        denominator = total_weight if self.dp is None else self.dp.expected_workers
        self.error_bound = self.quantizer.error_bound(len(done), denominator)
        return flat


def masked(meta: TensorMeta) -> bool:
    """The tensors a worker masks: its real floating-point ones (as worker_service.state.deltas takes them)."""
    return meta.torch_dtype.is_floating_point


def reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, WorkerError) else f"{type(exc).__name__}: {exc}"
