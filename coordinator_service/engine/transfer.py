"""Moving a round's weights: the global model out to every worker, and each worker's update back as checked raw
pieces that line up across workers."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from coordinator_service.engine.state import Contribution, RoundState, TransferSettings
from coordinator_service.engine.worker_client import WorkerClient, offered, speaks, upload_digest
from fedpi.runtime import elapsed
from fedpi.weights import compression, serde
from generated.fedpi.v1 import worker_pb2 as pb


@dataclass(frozen=True)
class Transfers:
    """How a run moves weights: its chunk size and encodings, for its model's architecture."""

    settings: TransferSettings
    architecture: str

    def broadcasts(self, payload: serde.WeightsPayload, clients: Sequence[WorkerClient]) -> dict[str, serde.Broadcast]:
        """The payload as each worker is sent it: one stream per encoding and digest, serialised once for all the
        workers that take it that way."""
        ways = {c.name: (offered(c, self.settings.model_encoding), upload_digest(c)) for c in clients}
        shared = {
            way: payload.broadcast(count, self.settings.chunk_size, *way)
            for way, count in Counter(ways.values()).items()
        }
        return {name: shared[way] for name, way in ways.items()}

    async def update_pieces(self, rnd: RoundState, c: Contribution) -> AsyncGenerator[bytes | memoryview, None]:
        """One worker's update as validated raw pieces, cut as the chunk size and encoding asked for (so every
        worker's pieces line up); its length and digest are checked when it ends. It must be the trained update of
        this round's id."""
        t = time.perf_counter()
        payload, chunk_size = rnd.payload, self.settings.chunk_size
        encoding = offered(c.client, self.settings.encoding)
        reader = serde.StreamReader(
            architecture=self.architecture,
            expected=payload.manifest,
            max_payload_bytes=max(payload.total_bytes, 1),
            encodings=(encoding,),
            base=rnd.reference if encoding == compression.INT8 else None,
        )
        sizes = serde.piece_sizes(payload.manifest, chunk_size, encoding)
        stream = c.client.get_weights(chunk_size, encoding, payload.total_bytes, speaks(c.client, "1.5"))
        async for chunk in stream:
            offset = reader.received
            # A slow digest is computed on threads of each stream's own, beside the one thread that folds.
            raw = reader.accept(chunk) if reader.hashes_fast else await asyncio.to_thread(reader.accept, chunk)
            if raw is None:
                if serde.is_header(chunk):
                    check_update_header(reader.started, rnd)
                continue
            if len(raw) != next(sizes, 0):
                raise serde.MalformedStream(
                    f"chunk at offset {offset} holds {len(raw)} bytes, not what "
                    f"{chunk_size}-byte chunks of this encoding hold"
                )
            yield raw
        reader.finish()
        if c.digest and reader.digest != c.digest:
            raise serde.MalformedStream("the update changed between two fetches of the same round")
        c.digest = reader.digest
        c.stats.bytes_received, c.stats.receive_seconds = reader.wire_bytes, elapsed(t)


def check_update_header(header: pb.WeightsHeader, rnd: RoundState) -> None:
    if header.round_id != rnd.round_id or not header.trained:
        # E.g. a worker restarted after Train, or another coordinator's weights: not this round's update.
        what = "trained update" if header.trained else "untrained weights"
        raise serde.MalformedStream(
            f"worker sent the {what} of round {header.round} (id {header.round_id!r}), "
            f"expected the trained update of round {rnd.number} (id {rnd.round_id!r})"
        )
