"""Before a service starts: can this CPU run this torch? A clear line instead of a crash loop.

Some torch releases use instructions a Raspberry Pi 4 (Cortex-A72, ARMv8.0-A, no LSE atomics) does not have: 2.4.0
and 2.10.0 die at import, PyPI's CUDA aarch64 wheels from 2.11 on in the multi-threaded backward pass. The process
just dies with SIGILL, over and over under Kubernetes. So the image runs a tiny training step in a child process
first (`FEDPI_PREFLIGHT=1`), and if that dies, says which CPU, which torch and what to do, and exits non-zero.
"""

from __future__ import annotations

import importlib.metadata
import os
import signal
import subprocess
import sys
from pathlib import Path

# A conv forward and backward with two threads (the multi-threaded BLAS path) and one SGD step.
_STEP = """
import torch
torch.set_num_threads(max(2, torch.get_num_threads()))
m = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 5), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 24 * 24, 10))
opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
loss = torch.nn.functional.cross_entropy(m(torch.randn(32, 1, 28, 28)), torch.randint(0, 10, (32,)))
loss.backward()
opt.step()
"""

# ARM "CPU part" numbers of the boards fedpi runs on.
_ARM_PARTS = {
    "0xd03": "Cortex-A53 (Raspberry Pi 3)",
    "0xd08": "Cortex-A72 (Raspberry Pi 4)",
    "0xd0b": "Cortex-A76 (Raspberry Pi 5)",
}
EXIT_UNSUPPORTED = 3


def describe_cpu(cpuinfo: str) -> str:
    """A short name for the CPU in /proc/cpuinfo's text."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    if "model name" in fields:
        return fields["model name"]
    part = fields.get("CPU part", "").lower()
    name = _ARM_PARTS.get(part, f"ARM CPU part {part or '?'}")
    features = fields.get("Features", "").split()
    if features and "atomics" not in features:
        name += ", no LSE atomics"
    return name


def torch_version() -> str:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def check(timeout: float = 600.0) -> str | None:
    """None if a training step runs here; else the one line that says why not and what to do."""
    try:
        proc = subprocess.run([sys.executable, "-c", _STEP], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None  # slow (an emulated CPU?) is not broken; the service's own timeouts take over
    if proc.returncode == 0:
        return None
    if proc.returncode < 0:
        how = f"died with {signal.Signals(-proc.returncode).name}"
        if -proc.returncode == signal.SIGILL:
            how += " (an instruction this CPU does not have)"
    else:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        how = f"failed with exit status {proc.returncode}: {last}"
    try:
        cpu = describe_cpu(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        cpu = "unknown CPU"
    return (
        f"fedpi cannot train here: torch {torch_version()} {how} on this CPU ({cpu}). Use a fedpi image built "
        f"with a torch that supports it (torch 2.9.1 for a Raspberry Pi 4, see docs/deploy.md, Supported boards), "
        f"or try "
        f"OMP_NUM_THREADS=1."
    )


def run_if_asked() -> None:
    """Called first by each service's main(): runs the check when FEDPI_PREFLIGHT is set, as the image does."""
    if os.environ.get("FEDPI_PREFLIGHT", "").strip().lower() not in ("1", "true", "yes", "on"):
        return
    problem = check()
    if problem is not None:
        print(problem, file=sys.stderr, flush=True)
        sys.exit(EXIT_UNSUPPORTED)


if __name__ == "__main__":
    problem = check()
    print(problem or f"torch {torch_version()} trains on this CPU")
    sys.exit(EXIT_UNSUPPORTED if problem else 0)
