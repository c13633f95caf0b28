"""The worker's weights as a state machine, without gRPC: which round's weights are installed and whether Train has
changed them, who holds the model, the buffers uploads take turns in, the snapshot GetWeights streams share, and
the int8 base, residual and replay of an update. The servicer decodes requests, calls this, and encodes answers."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Iterator

import numpy as np
import torch

from fedpi.net.protocol import ProtocolMismatch
from fedpi.weights import serde
from generated.fedpi.v1 import worker_pb2 as pb

NOT_TRAINABLE = -1  # weights_round after an interrupted Train: the next SetWeights makes the model whole again


class Busy(Exception):
    """Another call holds the model (training, or another upload): the caller should retry later."""


class TooManyDownloads(Exception):
    """More GetWeights streams at once than the worker serves."""


class Replay:
    """The items of an iterator, made once, on a thread, as the first reader needs them; every reader gets them all."""

    def __init__(self, source: Iterator):
        self._source = source
        self._items: list = []
        self._done = False
        self._lock = asyncio.Lock()  # one thread advances the source at a time

    async def replay(self) -> AsyncIterator:
        i = 0
        while True:
            if i == len(self._items):
                async with self._lock:
                    if i == len(self._items) and not self._done:
                        item = await asyncio.to_thread(next, self._source, _END)
                        if item is _END:
                            self._done = True
                        else:
                            self._items.append(item)
            if i == len(self._items):
                return
            yield self._items[i]
            i += 1


_END = object()


class WeightsState:
    """One worker's model and what is known of its weights. Methods that change the model run under `lock`."""

    def __init__(self, worker_id: str, model_name: str, model: torch.nn.Module):
        self.worker_id = worker_id
        self.model_name = model_name
        self.model = model
        self.round = 0  # the deterministic initial weights
        self.round_id = ""  # the coordinator's id of the round whose weights are installed
        self.trained = False  # Train has changed the installed weights since SetWeights
        self.training_round: int | None = None
        self.evaluating = False
        self.lock = asyncio.Lock()  # held while training, evaluating or installing: never seen half-done
        self.uploading = False  # one upload at a time bounds the memory held by partial uploads
        # Uploads take turns between two buffers: the model lives in one (install), the next upload fills the other.
        self.upload_buffer: bytearray | None = None
        self._model_buffer: bytearray | None = None
        # Shared by GetWeights streams until the weights change; it reads the model's own tensors (leave_snapshot).
        self._snapshot: serde.WeightsPayload | None = None
        self.downloads = 0
        # int8 deltas (TrainRequest.update_encoding): the weights Train started from, the quantisation error fed back
        # into the next update, and this update's chunks, quantised once however often they are fetched.
        self._base: list[torch.Tensor | None] | None = None
        self._residual: list[torch.Tensor | None] | None = None
        self._int8: tuple[int, Replay] | None = None  # (chunk size, its chunks)
        self.samples = 0  # trained by the last Train: the weight of its update

    # -- who holds the model -----------------------------------------------------------------------------------

    def busy_reason(self) -> str:
        if self.training_round is not None:
            return f"worker {self.worker_id} is training round {self.training_round}"
        if self.evaluating:
            return f"worker {self.worker_id} is evaluating its weights"
        return f"worker {self.worker_id} is installing weights"

    def check_free(self, then: str) -> None:
        """Busy, saying what holds the model and what the caller should do (`then`), if anything does."""
        if self.lock.locked():
            raise Busy(f"{self.busy_reason()}; {then}")

    # -- SetWeights --------------------------------------------------------------------------------------------

    def start_upload(self) -> None:
        self.check_free("weights were not installed, retry after it finishes")
        if self.uploading:
            raise Busy(f"worker {self.worker_id} is receiving another SetWeights stream; retry when it is done")
        self.uploading = True

    def install(self, state: dict[str, torch.Tensor], buffer: bytearray, round_: int, round_id: str) -> None:
        """Under the lock. The upload's buffer becomes the model's storage, no copy, and the storage it replaces
        takes the next upload, unless a GetWeights stream still reads it. A model that cannot take the buffer as it
        is (a state_dict entry that is not one of its parameters or buffers, or a tensor off its natural alignment)
        is copied into instead."""
        live = self.model.state_dict(keep_vars=True)
        own = {id(t) for t in itertools.chain(self.model.parameters(), self.model.buffers())}
        if all(id(t) in own and state[name].data_ptr() % state[name].element_size() == 0 for name, t in live.items()):
            with torch.no_grad():
                for name, t in live.items():
                    t.data = state[name]
            self.upload_buffer = None if self.downloads else self._model_buffer
            self._model_buffer = buffer
        else:
            self.leave_snapshot()
            self.model.load_state_dict(state)
            self.upload_buffer = buffer
        self.set_identity(round_, round_id)

    def set_identity(self, round_: int, round_id: str, trained: bool = False) -> None:
        self.round, self.round_id, self.trained = round_, round_id, trained
        self._snapshot = None
        self._base = self._int8 = None

    # -- Train and Evaluate ------------------------------------------------------------------------------------

    def check_trainable(self, round_: int, round_id: str) -> None:
        if round_ != self.round:
            raise ProtocolMismatch(
                f"worker {self.worker_id} holds the weights of round {self.round}, asked to train "
                f"round {round_}: call SetWeights for round {round_} first"
            )
        if round_id and round_id != self.round_id:
            raise ProtocolMismatch(
                f"worker {self.worker_id} holds the weights of round id {self.round_id!r}, asked to train "
                f"round id {round_id!r}: call SetWeights for that round first"
            )
        if round_id and self.trained:
            raise ProtocolMismatch(
                f"worker {self.worker_id} already trained the weights of round id {round_id!r}; an update "
                f"is one Train on freshly set weights: call SetWeights again"
            )

    def check_evaluable(self, round_id: str) -> None:
        self.check_free("call Evaluate after it has finished")
        if round_id and round_id != self.round_id:
            raise ProtocolMismatch(
                f"worker {self.worker_id} holds the weights of round id {self.round_id!r}, asked to "
                f"evaluate round id {round_id!r}: call SetWeights for that round first"
            )

    @contextlib.asynccontextmanager
    async def evaluation(self) -> AsyncIterator[None]:
        """Hold the model while it is measured: no SetWeights or Train may change it meanwhile."""
        async with self.lock:
            self.evaluating = True
            try:
                yield
            finally:
                self.evaluating = False

    def start_training(self, round_: int, int8_update: bool, secure_aggregation: bool = False) -> None:
        """Under the lock, before the model changes."""
        self.training_round = round_
        self.leave_snapshot()
        self._snapshot = self._int8 = None
        self.samples = 0
        self._keep_base(int8_update or secure_aggregation, residual=int8_update)

    def end_training(self, finished: bool) -> None:
        """Under the lock. Partly trained weights are nobody's: the next SetWeights makes the model whole again."""
        self.training_round = None
        if finished:
            self.trained = True
        else:
            self.set_identity(NOT_TRAINABLE, "")

    def _keep_base(self, keep: bool, residual: bool) -> None:
        """Before a Train whose update goes back as deltas (int8, or masked): keep the weights it starts from."""
        if not keep:
            self._base = None
            return
        self._base = [
            t.detach().reshape(-1).clone() if t.is_floating_point() else None for t in self.model.state_dict().values()
        ]
        if residual and self._residual is None:
            self._residual = [torch.zeros(len(t), dtype=torch.float32) if t is not None else None for t in self._base]

    # -- GetMaskedUpdate ---------------------------------------------------------------------------------------

    def check_masked(self, round_id: str, max_downloads: int) -> None:
        self.check_free("call GetMaskedUpdate after Train has finished")
        if round_id != self.round_id or not self.trained or self._base is None:
            raise ProtocolMismatch(
                f"worker {self.worker_id} has no update of round id {round_id!r} to mask: it holds "
                f"{'trained' if self.trained else 'untrained'} weights of round id {self.round_id!r}"
                f"{'' if self._base is not None else ', not trained for secure aggregation'} "
                f"(SetWeights, then Train with secure_aggregation set)"
            )
        self.check_download(pb.CHUNK_ENCODING_RAW, max_downloads)

    def deltas(self, piece: int) -> Iterator[np.ndarray]:
        """Trained minus set weights of the floating-point tensors, in manifest order, `piece` elements at a time.
        Taken from the tensors as they are now: while a stream reads them (`downloads`), an install leaves them be."""
        base = self._base or []
        pairs = [(t.detach().reshape(-1), b) for t, b in zip(self.model.state_dict().values(), base) if b is not None]
        return (
            (now[start : start + piece].double() - before[start : start + piece].double()).numpy()
            for now, before in pairs
            for start in range(0, len(now), piece)
        )

    # -- GetWeights --------------------------------------------------------------------------------------------

    def check_download(self, encoding: int, max_downloads: int) -> None:
        self.check_free("call GetWeights after Train has finished")
        if encoding == pb.CHUNK_ENCODING_INT8_DELTA and (self._base is None or not self.trained):
            raise ProtocolMismatch(
                f"worker {self.worker_id} has no int8 delta to send: its weights were not "
                f"trained by a Train that asked for one (TrainRequest.update_encoding)"
            )
        if self.downloads >= max_downloads:
            raise TooManyDownloads(
                f"worker {self.worker_id} already serves {self.downloads} GetWeights streams, "
                f"its limit; retry when one has finished"
            )

    async def snapshot(self) -> serde.WeightsPayload:
        """The weights as GetWeights streams send them, shared by every stream until they change: the model's own
        tensors, no copy (a copy of a large model costs as much CPU as sending it on loopback)."""
        async with self.lock:
            if self._snapshot is None:
                self._snapshot = serde.WeightsPayload(
                    self.model.state_dict(),
                    round=self.round,
                    architecture=self.model_name,
                    round_id=self.round_id,
                    trained=self.trained,
                )
            return self._snapshot

    def leave_snapshot(self) -> None:
        """Before the model changes (under the lock): streams still sending the snapshot keep the tensors it reads,
        and the model moves on in copies of them. A slow reader never holds the model up."""
        if self._snapshot is None or not self.downloads:
            return
        with torch.no_grad():
            for t in itertools.chain(self.model.parameters(), self.model.buffers()):
                t.data = t.data.clone()

    def int8_update(self, payload: serde.WeightsPayload, chunk_size: int, trailer: str | None) -> AsyncIterator:
        """The update as int8 deltas, quantised once (the residual moves on once per update) and chunk by chunk as
        the first fetch sends them: a second fetch, e.g. for clipping, replays the same bytes."""
        if self._int8 is None:
            chunks = payload.chunks(
                chunk_size,
                pb.CHUNK_ENCODING_INT8_DELTA,
                trailer=trailer,
                base=self._base,
                residual=self._residual,
                encoded=True,
            )
            self._int8 = (chunk_size, Replay(chunks))
        if self._int8[0] != chunk_size:
            raise ProtocolMismatch(
                f"this update was quantised in {self._int8[0]}-byte chunks (a scale per chunk); "
                f"fetch it again with chunk_size={self._int8[0]}"
            )
        return self._int8[1].replay()
