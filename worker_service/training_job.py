"""One Train call's training thread and the progress it reports, sampled by the servicer's response stream."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from generated.fedpi.v1 import worker_pb2 as pb
from worker_service.trainer import TrainConfig, Trainer, TrainOutcome


class TrainingJob:
    """Runs `Trainer.train` in a thread. The thread reports after batches; the stream asks `next_progress` for what
    to send: fresh progress as soon as a batch report arrives, else a heartbeat (marked as such) every `every`
    seconds, so that a slow batch is visibly alive and a stuck one visibly stuck."""

    def __init__(self, trainer: Trainer, cfg: TrainConfig, progress_every: float):
        self._loop = asyncio.get_running_loop()
        self._latest = pb.TrainProgress()
        self._fresh = asyncio.Event()
        self.cancelled = threading.Event()
        self.future: asyncio.Future[TrainOutcome] = self._loop.run_in_executor(
            None, trainer.train, cfg, self._report, self.cancelled, progress_every
        )

    def _report(self, done: int, total: int, loss: float, seconds: float) -> None:  # the training thread
        msg = pb.TrainProgress(batches_done=done, batches_total=total, mean_loss=loss, seconds=seconds)
        self._loop.call_soon_threadsafe(self._publish, msg)

    def _publish(self, msg: pb.TrainProgress) -> None:
        self._latest = msg
        self._fresh.set()

    async def next_progress(self, every: float) -> pb.TrainProgress | None:
        """The next message to stream, or None once training has ended (its outcome is in `future`)."""
        if not self._fresh.is_set() and not self.future.done():
            waiter: asyncio.Future[Any] = asyncio.ensure_future(self._fresh.wait())
            try:
                pending: set[asyncio.Future[Any]] = {waiter, self.future}
                await asyncio.wait(pending, timeout=every, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
        if self._fresh.is_set():  # reports are published before the future completes, so none is lost
            self._fresh.clear()
            return self._latest
        if self.future.done():
            return None
        heartbeat = pb.TrainProgress()
        heartbeat.CopyFrom(self._latest)
        heartbeat.heartbeat = True
        return heartbeat

    async def stop(self) -> None:
        """Ask the thread to stop and wait until it has, even while this task is being cancelled: whoever holds the
        model lock must not give it up while the thread still trains the model."""
        self.cancelled.set()
        interrupted = False
        while not self.future.done():
            try:
                await asyncio.wait({self.future})
            except asyncio.CancelledError:
                interrupted = True  # passed on once the thread has ended
        if interrupted:
            raise asyncio.CancelledError()
