"""An emulated Raspberry Pi LAN for benchmarks: ../shared/tools/pilan puts each worker in a network namespace of its
own behind a rate-limited link, with a CPU quota. Only where pilan is installed and we are root."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

from coordinator_service.local import LocalWorker, free_port
from tests.conftest import ROOT

PILAN = ROOT.parent / "shared" / "tools" / "pilan"


def available() -> bool:
    return PILAN.is_file() and os.geteuid() == 0


def pilan(*args: str) -> str:
    return subprocess.run([str(PILAN), *args], check=True, capture_output=True, text=True).stdout.strip()


def set_cpu_share(pi: int, pct: int) -> None:
    """pilan gives every Pi the same quota; this gives Pi `pi` its own, in pilan's cgroup, with pilan's period."""
    cgroup = Path(os.environ.get("PILAN_CGROUP_ROOT", "/sys/fs/cgroup/cpu")) / f"fpi{pi}"
    period = int((cgroup / "cpu.cfs_period_us").read_text())
    (cgroup / "cpu.cfs_quota_us").write_text(str(period * pct // 100))


@contextmanager
def lan(count: int, rate: str = "100mbit", cpu_pct: int = 15):
    """`count` emulated Pis, torn down afterwards whatever happens."""
    pilan("up", str(count), "--rate", rate, "--cpu-pct", str(cpu_pct))
    try:
        yield
    finally:
        pilan("down")


def pi_worker(pi: int, name: str, args: Sequence[str], log_dir: Path) -> LocalWorker:
    """A worker process that runs as Pi `pi` (1-based), listening on the Pi's own address."""
    port = free_port()
    w = LocalWorker(name, args, log_dir, port=port)
    w.argv = [str(PILAN), "exec", str(pi), *w.argv]
    # The emulated LAN beyond loopback, without credentials: what --insecure is for.
    w.argv[w.argv.index("--host") + 1] = "0.0.0.0"
    w.argv.append("--insecure")
    w.address = w.health_address = f"{pilan('addr', str(pi))}:{port}"
    return w
