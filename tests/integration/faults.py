"""Fault-injection helpers: a TCP proxy that cuts or corrupts a worker's replies, and a coordinator run whose log
can be watched while it happens. Everything is bounded in time and stops by itself."""

from __future__ import annotations

import asyncio
import json
import queue
import subprocess
import sys
import threading
import time

from tests.conftest import ROOT


class FaultyProxy:
    """A TCP proxy on 127.0.0.1 in front of a worker. Bytes pass through unchanged, except that the worker's replies
    can be slowed (`rate` bytes/s), cut off after `cut_after` bytes, or get one byte flipped at offset `flip_at`.
    Cut and flip happen once, counted over all connections; later connections pass cleanly."""

    def __init__(
        self, target_port: int, *, cut_after: int | None = None, flip_at: int | None = None, rate: float | None = None
    ):
        self.target_port = target_port
        self.cut_after, self.flip_at, self.rate = cut_after, flip_at, rate
        self.sent = 0  # worker -> client bytes so far
        self.fired: list[str] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        assert self._ready.wait(10), "proxy did not start"
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def _handle(self, client_reader, client_writer) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            return
        writers = (client_writer, upstream_writer)
        await asyncio.gather(
            self._pump(client_reader, upstream_writer, writers, reply=False),
            self._pump(upstream_reader, client_writer, writers, reply=True),
            return_exceptions=True,
        )

    async def _pump(self, reader, writer, writers, *, reply: bool) -> None:
        try:
            while data := await reader.read(16384):
                if reply:
                    data = self._mangle(bytearray(data))
                    if data is None:  # cut: drop both directions at once
                        for w in writers:
                            w.transport.abort()
                        return
                    if self.rate:
                        await asyncio.sleep(len(data) / self.rate)
                writer.write(bytes(data))
                await writer.drain()
        finally:
            writer.close()

    def _mangle(self, data: bytearray) -> bytearray | None:
        start, self.sent = self.sent, self.sent + len(data)
        if self.cut_after is not None and "cut" not in self.fired and self.sent > self.cut_after:
            self.fired.append("cut")
            return None
        if self.flip_at is not None and "flip" not in self.fired and start <= self.flip_at < self.sent:
            self.fired.append("flip")
            data[self.flip_at - start] ^= 0xFF
        return data


class CoordinatorRun:
    """`python -m coordinator_service ...` in the background, its JSON log events collected as they come."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "coordinator_service", *args, "--log-format", "json"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.events: list[dict] = []
        self.lines: list[str] = []
        self._queue: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            try:
                event = json.loads(line)
            except ValueError:
                continue
            self.events.append(event)
            self._queue.put(event)

    def wait_for(self, event: str, timeout: float = 120, **fields) -> dict:
        """Block until an event with this name (and these field values) is logged."""
        deadline = time.monotonic() + timeout
        for seen in list(self.events):
            if seen.get("event") == event and all(seen.get(k) == v for k, v in fields.items()):
                return seen
        while time.monotonic() < deadline:
            try:
                seen = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if seen.get("event") == event and all(seen.get(k) == v for k, v in fields.items()):
                return seen
        raise AssertionError(f"no {event} {fields} within {timeout} s; log tail:\n{''.join(self.lines[-30:])}")

    def finish(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)

    def rounds(self) -> list[dict]:
        return [e for e in self.events if e.get("event") == "round_finished"]
