"""The servicer without a network: GetWeights readers are bounded in number and share one snapshot."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from fedpi.data import Dataset, Split
from fedpi.models import build_model
from fedpi.weights import serde, wire
from generated.fedpi.v1 import worker_pb2 as pb
from worker_service.servicer import Limits, WorkerServicer


class Aborted(Exception):
    def __init__(self, code, details):
        super().__init__(details)
        self.code = code


class FakeContext:
    """A reader that takes the first chunk, then stalls until `release` is set."""

    def __init__(self, release: asyncio.Event):
        self.release = release
        self.chunks: list[pb.WeightsChunk] = []

    def invocation_metadata(self):
        return ()

    def peer(self):
        return "test"

    async def write(self, chunk):
        self.chunks.append(wire.from_wire(wire.to_wire(chunk)))  # as the client would read it off the wire
        await self.release.wait()

    async def abort(self, code, details):
        raise Aborted(code, details)


def _servicer() -> WorkerServicer:
    split = Split(torch.zeros(8, 28, 28, dtype=torch.uint8), torch.zeros(8, dtype=torch.int64), 0.0, 1.0)
    return WorkerServicer(
        worker_id="w",
        model_name="reference-cnn",
        model=build_model("reference-cnn"),
        data=Dataset("tiny", split, split),
        partition="0/1",
        limits=Limits(max_concurrent_downloads=3),
    )


def test_concurrent_readers_are_bounded_and_share_one_snapshot():
    async def scenario():
        servicer, release = _servicer(), asyncio.Event()
        contexts = [FakeContext(release) for _ in range(3)]
        readers = [asyncio.ensure_future(servicer.GetWeights(pb.GetWeightsRequest(), c)) for c in contexts]
        await asyncio.sleep(0.2)
        snapshots = {id(servicer.state._snapshot)}
        with pytest.raises(Aborted) as refused:
            await asyncio.wait_for(servicer.GetWeights(pb.GetWeightsRequest(), FakeContext(release)), 5)
        release.set()
        await asyncio.gather(*readers)
        # a cancelled reader gives its slot back at once
        stalled = asyncio.ensure_future(servicer.GetWeights(pb.GetWeightsRequest(), FakeContext(asyncio.Event())))
        await asyncio.sleep(0.1)
        stalled.cancel()
        await asyncio.gather(stalled, return_exceptions=True)
        return servicer, contexts, snapshots, refused.value

    servicer, contexts, snapshots, refused = asyncio.run(scenario())
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "3 GetWeights streams" in str(refused)
    assert len(snapshots) == 1 and servicer.state.downloads == 0
    digests = {c.chunks[0].header.digest for c in contexts}
    assert len(digests) == 1 and all(len(c.chunks) > 1 for c in contexts)


def test_the_snapshot_follows_new_weights():
    async def scenario():
        servicer = _servicer()
        first = await servicer.state.snapshot()
        assert await servicer.state.snapshot() is first
        servicer.state.set_identity(3, "run/3.1")
        second = await servicer.state.snapshot()
        return first, second

    first, second = asyncio.run(scenario())
    assert first is not second and (second.round, second.round_id, second.trained) == (3, "run/3.1", False)


async def _chunks(chunks):
    for chunk in chunks:
        yield chunk


def test_a_stalled_reader_keeps_its_weights_while_new_ones_are_installed_without_a_copy_otherwise():
    """Snapshots share the model's tensors; only a change while a stream still reads them moves the model to copies,
    and that stream still sends the weights it started with, intact."""

    async def scenario():
        servicer, release = _servicer(), asyncio.Event()
        old = {k: v.clone() for k, v in servicer.model.state_dict().items()}
        stalled = FakeContext(release)
        reader = asyncio.ensure_future(servicer.GetWeights(pb.GetWeightsRequest(chunk_size=4096), stalled))
        await asyncio.sleep(0.1)
        shared = servicer.state._snapshot._flat[0].data_ptr() == servicer.model.state_dict()["conv1.weight"].data_ptr()
        new = build_model("reference-cnn", seed=5).state_dict()
        payload = serde.WeightsPayload(new, round=2, architecture="reference-cnn", round_id="run/2.1")
        await servicer.SetWeights(_chunks(payload.chunks(1 << 20, trailer="xxh3_128")), FakeContext(release))
        installed = {k: v.clone() for k, v in servicer.model.state_dict().items()}
        release.set()
        await reader
        # no stream reads the weights now: uploads take turns between two buffers, the model living in one of them
        homes = []
        for _ in range(4):
            await servicer.GetWeights(pb.GetWeightsRequest(), FakeContext(release))
            await servicer.SetWeights(_chunks(payload.chunks()), FakeContext(release))
            homes.append(servicer.model.state_dict()["conv1.weight"].data_ptr())
        return old, new, installed, stalled.chunks, shared, homes

    old, new, installed, sent, shared, homes = asyncio.run(scenario())
    reader = serde.StreamReader(architecture="reference-cnn", expected=serde.manifest_of(old))
    received = serde.read_state_dict(reader, iter(sent))
    assert shared and homes[0] == homes[2] and homes[1] == homes[3] and homes[0] != homes[1]
    assert all(torch.equal(received[k], v) for k, v in old.items())
    assert all(torch.equal(installed[k], v) for k, v in new.items())


class Misaligned(torch.nn.Module):
    """A float64 tensor 12 bytes into the payload: off its natural alignment in an upload's buffer."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(3))
        self.b = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))


def test_a_model_that_cannot_live_in_the_upload_buffer_is_copied_into():
    async def scenario():
        split = Split(torch.zeros(8, 28, 28, dtype=torch.uint8), torch.zeros(8, dtype=torch.int64), 0.0, 1.0)
        servicer = WorkerServicer(
            worker_id="w", model_name="odd", model=Misaligned(), data=Dataset("tiny", split, split), partition="0/1"
        )
        before = [p.data_ptr() for p in servicer.model.parameters()]
        new = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([4.0, 5.0], dtype=torch.float64)}
        payload = serde.WeightsPayload(new, round=2, architecture="odd", round_id="run/2.1")
        await servicer.SetWeights(_chunks(payload.chunks()), FakeContext(asyncio.Event()))
        return servicer.model, before, new

    model, before, new = asyncio.run(scenario())
    assert [p.data_ptr() for p in model.parameters()] == before
    assert all(torch.equal(model.state_dict()[k], v) for k, v in new.items())
