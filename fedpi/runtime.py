"""Process-level helpers both services use: secrets from files, start-up garbage collection, peak memory."""

from __future__ import annotations

import gc
import resource
import time


def read_secret(path: str, flag: str) -> str:
    """A token from a file (a mounted Kubernetes Secret), stripped; a clear error if missing or empty."""
    try:
        value = open(path, encoding="utf-8").read().strip()
    except OSError as exc:
        raise ValueError(f"{flag} {path}: {exc.strerror}") from None
    if not value:
        raise ValueError(f"{flag} {path} is empty")
    return value


def freeze_startup_objects() -> None:
    """Move everything imported so far (torch alone is hundreds of thousands of objects) out of the garbage
    collector's sight. Without this, the collections that streaming's short-lived objects trigger walk all of it:
    over a tenth of the coordinator's CPU time on a large model."""
    gc.collect()
    gc.freeze()


def peak_rss_mb(pid: int | str = "self") -> float:
    """A process's peak resident memory (this one's by default). From /proc where there is one: getrusage's figure
    also counts, after fork and exec, what the parent process held at the fork."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def elapsed(start: float) -> float:
    return time.perf_counter() - start
