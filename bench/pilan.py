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


def set_cpu_share(pi: int, pct: int, period_us: int | None = None) -> None:
    """pilan gives every Pi the same quota; this gives Pi `pi` its own, in pilan's cgroup, with pilan's period unless
    `period_us` is given (a share under 10% needs 100 ms: the kernel's smallest quota is 1 ms)."""
    cgroup = Path(os.environ.get("PILAN_CGROUP_ROOT", "/sys/fs/cgroup/cpu")) / f"fpi{pi}"
    if period_us is not None:
        (cgroup / "cpu.cfs_quota_us").write_text("-1")  # a quota may never exceed its period, even for a moment
        (cgroup / "cpu.cfs_period_us").write_text(str(period_us))
    period = int((cgroup / "cpu.cfs_period_us").read_text())
    (cgroup / "cpu.cfs_quota_us").write_text(str(period * pct // 100))


def set_rate(pi: int, rate: str) -> None:
    """Pi `pi`'s link, both ways, at `rate` (tc units) instead of the rate every Pi got from `pilan up`."""
    burst, latency = "16kb", "50ms"
    tbf = ["root", "tbf", "rate", rate, "burst", burst, "latency", latency]
    subprocess.run(["tc", "qdisc", "replace", "dev", f"fpiv{pi}", *tbf], check=True)
    subprocess.run(["tc", "-n", f"fpi{pi}", "qdisc", "replace", "dev", "eth0", *tbf], check=True)


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
