"""The worker's weights state machine as a plain class: no gRPC, no servicer."""

from __future__ import annotations

import asyncio

import pytest
import torch
from torch import nn

from fedpi.net.protocol import ProtocolMismatch
from fedpi.weights import serde
from generated.fedpi.v1 import worker_pb2 as pb
from worker_service.state import NOT_TRAINABLE, Busy, TooManyDownloads, WeightsState


def _state() -> WeightsState:
    torch.manual_seed(0)
    return WeightsState("w", "tiny", nn.Linear(3, 2))


def _upload(state: WeightsState, value: float) -> tuple[dict[str, torch.Tensor], bytearray]:
    """A state_dict living in one buffer, as an upload assembles it."""
    tensors = {k: torch.full_like(v, value) for k, v in state.model.state_dict().items()}
    payload = serde.WeightsPayload(tensors, round=0, architecture="tiny")
    reader = serde.StreamReader(architecture="tiny", expected=None)
    assembler = serde.Assembler(reader, state.upload_buffer)
    for chunk in payload.chunks(1 << 20):
        assembler.add(chunk)
    return assembler.finish(), assembler.buffer


def _install(state: WeightsState, value: float, round_: int, round_id: str) -> bytearray:
    tensors, buffer = _upload(state, value)
    state.install(tensors, buffer, round_, round_id)
    return buffer


def test_train_needs_the_weights_of_its_round_untrained():
    state = _state()
    state.check_trainable(0, "")  # the initial weights
    _install(state, 1.0, 4, "run/4.1")
    with pytest.raises(ProtocolMismatch, match="holds the weights of round 4"):
        state.check_trainable(3, "run/3.1")
    with pytest.raises(ProtocolMismatch, match="round id 'run/4.1'"):
        state.check_trainable(4, "run/4.2")
    state.check_trainable(4, "run/4.1")
    state.start_training(4, int8_update=False)
    state.end_training(finished=True)
    assert (state.round, state.round_id, state.trained) == (4, "run/4.1", True)
    with pytest.raises(ProtocolMismatch, match="already trained"):
        state.check_trainable(4, "run/4.1")
    _install(state, 2.0, 4, "run/4.1")  # the same round sent again: trainable again
    state.check_trainable(4, "run/4.1")


def test_an_abandoned_train_leaves_weights_nobody_can_train_until_the_next_upload():
    state = _state()
    _install(state, 1.0, 2, "run/2.1")
    state.start_training(2, int8_update=False)
    state.end_training(finished=False)
    assert (state.round, state.round_id, state.trained) == (NOT_TRAINABLE, "", False)
    with pytest.raises(ProtocolMismatch):
        state.check_trainable(2, "run/2.1")
    _install(state, 1.0, 2, "run/2.1")
    state.check_trainable(2, "run/2.1")


def test_the_upload_buffer_becomes_the_model_and_the_old_one_takes_the_next_upload():
    state = _state()
    first = _install(state, 1.0, 1, "a")
    assert state.model.weight.untyped_storage().data_ptr() == torch.frombuffer(first, dtype=torch.uint8).data_ptr()
    assert state.upload_buffer is None  # the initial model had no buffer of its own to give
    second = _install(state, 2.0, 2, "b")
    assert state.upload_buffer is first and second is not first
    assert torch.equal(state.model.weight, torch.full((2, 3), 2.0))
    state.downloads = 1  # a GetWeights stream still reads the model's storage: it is not handed to an upload
    _install(state, 3.0, 3, "c")
    assert state.upload_buffer is None


def test_the_holder_of_the_model_is_named_when_a_call_is_refused():
    async def scenario():
        state = _state()
        async with state.lock:
            state.start_training(0, int8_update=False)
            with pytest.raises(Busy, match="training round 0; one Train at a time"):
                state.check_free("one Train at a time")
            with pytest.raises(Busy, match="training round 0"):
                state.start_upload()
            state.end_training(finished=True)
        state.check_free("anything")
        state.start_upload()
        with pytest.raises(Busy, match="another SetWeights stream"):
            state.start_upload()

    asyncio.run(scenario())


def test_int8_deltas_exist_only_after_a_train_that_asked_for_them_and_replay_in_one_chunk_size():
    async def scenario():
        state = _state()
        with pytest.raises(ProtocolMismatch, match="no int8 delta"):
            state.check_download(pb.CHUNK_ENCODING_INT8_DELTA, 4)
        state.start_training(0, int8_update=True)
        with torch.no_grad():
            state.model.weight.add_(0.5)
        state.end_training(finished=True)
        state.check_download(pb.CHUNK_ENCODING_INT8_DELTA, 4)
        payload = await state.snapshot()
        first = [c async for c in state.int8_update(payload, 16, "xxh3_128")]
        again = [c async for c in state.int8_update(payload, 16, "xxh3_128")]
        assert first == again  # quantised once: a second fetch sends the same bytes
        with pytest.raises(ProtocolMismatch, match="chunk_size=16"):
            state.int8_update(payload, 32, "xxh3_128")
        state.downloads = 4
        with pytest.raises(TooManyDownloads):
            state.check_download(pb.CHUNK_ENCODING_RAW, 4)

    asyncio.run(scenario())


def test_a_reader_keeps_the_snapshot_it_started_while_the_model_moves_on():
    async def scenario():
        state = _state()
        snapshot = await state.snapshot()
        assert await state.snapshot() is snapshot  # shared until the weights change
        sent = [t.clone() for t in snapshot._flat]
        state.downloads = 1
        state.start_training(0, int8_update=False)
        with torch.no_grad():
            state.model.weight.add_(1.0)
        state.end_training(finished=True)
        assert all(torch.equal(a, b) for a, b in zip(sent, snapshot._flat))
        assert await state.snapshot() is not snapshot

    asyncio.run(scenario())
