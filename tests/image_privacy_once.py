"""Inside an image (e.g. on an emulated Pi CPU): secure aggregation, and DP-SGD where Opacus is installed, work
there. A worker on loopback with random digits trains once with DP-SGD (if Opacus is there) and reports its epsilon,
then takes part in a secure-aggregation round as worker 1 of 3 (the other two are sessions in this process): its
keys, its sealed shares, and its masked update, which the others' shares unmask to the update it trained. Then the
same with distributed DP: its update clipped and noised on this CPU, the sum's noise measured against the
configuration. Each stage is timed.

python /check/privacy_once.py   (this file mounted alone, not tests/, whose folders would shadow the packages)
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from coordinator_service.engine.worker_client import Expected, WorkerClient
from coordinator_service.local import free_port, wait_serving
from fedpi.data import write_idx
from fedpi.mnist_task import MnistTask
from fedpi.secagg import shamir
from fedpi.secagg.masks import DistributedNoise, MaskStream, Quantizer
from fedpi.task import initial_model
from fedpi.weights import serde
from generated.fedpi.v1 import worker_pb2 as pb
from worker_service.secagg import Session

ROUND_ID = "image/1.1"
WEIGHT = 160
DP_CLIP = 1e-3  # far below the update's norm: the worker clips it, and the noise is 1e-3 a weight


def config(i: int, round_id: str = ROUND_ID, **dp) -> pb.SecAggConfig:
    return pb.SecAggConfig(round_id=round_id, index=i, neighbours=[j for j in (1, 2, 3) if j != i], threshold=2,
                           clip=1.0, workers=3, **{"max_weight": WEIGHT, **dp})  # fmt: skip


async def weights(client: WorkerClient) -> dict:
    reader = serde.StreamReader(architecture="reference-cnn", expected=None)
    chunks = [c async for c in client.get_weights(1 << 20, pb.CHUNK_ENCODING_RAW, 0)]
    return serde.read_state_dict(reader, iter(chunks))


async def secure_round(client: WorkerClient, model, architecture: str, round_id: str, dp: dict):
    """Worker 1 (the image's) beside two sessions with zero updates: keys, shares, Train, its masked update, unmask.
    Returns the stages' times and, plain, the largest error against the trained update (asserted within the bound)
    or, with `dp`, the measured deviation of the sum's noise (asserted against the configuration)."""
    timed = {}
    coordinates = sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())
    if dp:
        dp = {**dp, "coordinates": coordinates}
    payload = serde.WeightsPayload(model.state_dict(), round=1, architecture=architecture, round_id=round_id)
    await client.set_weights(payload.broadcast(1, 1 << 20, pb.CHUNK_ENCODING_RAW, None), payload.total_bytes)
    t = time.monotonic()
    keys = {1: await client.secagg_keys(config(1, round_id, **dp))}
    timed["keys"] = time.monotonic() - t
    others = {i: Session(config(i, round_id, **dp)) for i in (2, 3)}
    keys |= {i: s.public_keys() for i, s in others.items()}
    peers = {i: [pb.PeerKeys(index=j, cipher_public_key=k.cipher_public_key, mask_public_key=k.mask_public_key)
                 for j, k in keys.items() if j != i] for i in keys}  # fmt: skip
    t = time.monotonic()
    mine = await client.secagg_shares(pb.SecAggSharesRequest(round_id=round_id, peers=peers[1]))
    timed["shares"] = time.monotonic() - t
    sealed = {i: [s for s in mine.shares if s.receiver == i] for i in (2, 3)}
    for i, s in others.items():
        for share in s.shares(peers[i]).shares:
            sealed.setdefault(share.receiver, []).append(share)
    await client.train(pb.TrainRequest(round=1, round_id=round_id, local_batches=5, batch_size=32,
                                       learning_rate=0.01, secure_aggregation=True))  # fmt: skip
    t = time.monotonic()
    data = bytearray()
    async for chunk in client.get_masked_update(pb.GetMaskedUpdateRequest(round_id=round_id, peers=[2, 3]), 0):
        if chunk.WhichOneof("kind") == "data":
            data += chunk.data.data
    timed["masked update"] = time.monotonic() - t
    total = np.frombuffer(bytes(data), "<u4").copy()
    zeros = np.zeros(coordinates)
    for i, s in others.items():  # their updates are zero: in the sum, all pairwise masks cancel
        mine_peers = [j for j in (1, 2, 3) if j != i]
        for chunk in s.masked_update(mine_peers, lambda: [zeros], coordinates, 0 if not dp else 1, 1 << 20):
            if chunk.WhichOneof("kind") == "data":
                start = chunk.data.offset // 4
                values = np.frombuffer(chunk.data.data, "<u4")
                total[start : start + len(values)] += values
    t = time.monotonic()
    request = pb.SecAggUnmaskRequest(round_id=round_id, survivors=[2, 3], shares=sealed[1])
    answers = {1: await client.secagg_unmask(request)}
    timed["unmask"] = time.monotonic() - t
    for i, s in others.items():
        survivors = [j for j in (1, 2, 3) if j != i]
        answers[i] = s.unmask(pb.SecAggUnmaskRequest(round_id=round_id, survivors=survivors, shares=sealed[i]))
    for owner in (1, 2, 3):
        held = {h: r.share for h, a in answers.items() for r in a.self_mask_shares if r.owner == owner}
        total -= MaskStream(shamir.combine(held, 2, 32)).next(len(total))
    trained = await weights(client)
    delta = np.concatenate([(trained[k].double() - v.double()).reshape(-1).numpy()
                            for k, v in model.state_dict().items() if v.is_floating_point()])  # fmt: skip
    if not dp:
        q = Quantizer(1.0, 3, WEIGHT)
        assert int(total[-1]) == WEIGHT, int(total[-1])
        error = float(np.abs(q.mean_delta(total[:-1], WEIGHT) - delta).max())
        assert error <= q.error_bound(1, WEIGHT), (error, q.error_bound(1, WEIGHT))
        return timed, error
    noise = DistributedNoise(DP_CLIP, 1.0, 3, coordinates)
    q = Quantizer(1.0, 3, 1, noise)
    assert int(total[-1]) == 3, int(total[-1])  # three workers, each weighing 1
    clipped = delta * min(1.0, DP_CLIP / float(np.sqrt(np.dot(delta, delta))))
    residual = total[:-1].view(np.int32) / q.scale - clipped
    want = noise.sum_std(q.scale, 3)
    assert abs(residual.std() / want - 1) < 0.03 and abs(residual.mean()) < 5 * want / np.sqrt(coordinates), (
        residual.std(),
        want,
    )
    return timed, float(residual.std())


async def rounds(address: str) -> None:
    client = WorkerClient("pi", address, idle_timeout=900, rpc_timeout=900)
    timed = {}
    try:
        task = MnistTask(model="reference-cnn")
        model = initial_model(task)
        await client.handshake(Expected.of(task, model))
        if importlib.util.find_spec("opacus") is None:
            print("DP-SGD: Opacus is not in this image (fedpi[privacy]); secure aggregation only", flush=True)
        else:
            t = time.monotonic()
            result = await client.train(pb.TrainRequest(round=0, local_batches=5, batch_size=32, learning_rate=0.01,
                                                         dp_sgd_noise_multiplier=1.0, dp_sgd_max_grad_norm=1.0,
                                                         dp_delta=1e-5))  # fmt: skip
            assert result.dp_epsilon > 0, result
            print(f"DP-SGD Train: {result.batches} batches, epsilon {result.dp_epsilon:.3f} "
                  f"({time.monotonic() - t:.0f} s)", flush=True)  # fmt: skip
        timed, error = await secure_round(client, model, task.architecture, ROUND_ID, {})
        print("secure aggregation on this CPU: " + ", ".join(f"{k} {v:.2f} s" for k, v in timed.items())
              + f"; unmasked to the trained update within {error:.1e}", flush=True)  # fmt: skip
        dp = dict(max_weight=1, unweighted=True, dp_clip_norm=DP_CLIP, dp_noise_multiplier=1.0, dp_survivors=3)
        timed, std = await secure_round(client, model, task.architecture, ROUND_ID + "-dp", dp)
        print("distributed DP on this CPU: " + ", ".join(f"{k} {v:.2f} s" for k, v in timed.items())
              + f"; the noise in the sum measured {std:.4g} a weight, as configured", flush=True)  # fmt: skip
    finally:
        await client.close()


def main() -> int:
    data = Path(tempfile.mkdtemp())
    gen = np.random.default_rng(0)
    for prefix, n in (("train", 320), ("t10k", 64)):
        write_idx(data / f"{prefix}-images-idx3-ubyte.gz", gen.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(data / f"{prefix}-labels-idx1-ubyte.gz", gen.integers(0, 10, n, dtype=np.uint8))
    port = free_port()
    argv = [sys.executable, "-m", "worker_service", "--host", "127.0.0.1", "--port", str(port), "--dataset", "mnist",
            "--data-dir", str(data), "--no-download", "--log-format", "json"]  # fmt: skip
    worker = subprocess.Popen(argv, env=os.environ)
    try:
        asyncio.run(wait_serving(f"127.0.0.1:{port}", worker, timeout=900))
        asyncio.run(rounds(f"127.0.0.1:{port}"))
    finally:
        worker.terminate()
        worker.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
