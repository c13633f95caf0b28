"""What a board knows about itself (GetInfo's and Train progress's `health`): CPU temperature, the Raspberry Pi
firmware's throttling flags, and free memory, read from sysfs and procfs under a root (/ on a board; a fake tree in
tests, or the host's /sys mounted elsewhere in a container). Whatever cannot be read stays absent."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from generated.fedpi.v1 import worker_pb2 as pb

# Thermal zones that measure the CPU, by the `type` their drivers give (Raspberry Pi, x86, other ARM boards).
CPU_ZONES = ("cpu-thermal", "cpu_thermal", "x86_pkg_temp", "soc_thermal", "soc-thermal")
# Where a Raspberry Pi's firmware driver exposes get_throttled (the value `vcgencmd get_throttled` prints).
THROTTLED_FILES = (
    "sys/devices/platform/soc/soc:firmware/get_throttled",
    "sys/devices/platform/*/*firmware/get_throttled",
)
# get_throttled's bits: the condition now (bit n) and since boot (bit n + 16).
THROTTLE_BITS = {"under_voltage": 0, "frequency_capped": 1, "throttled": 2, "soft_temperature_limit": 3}
UNLIMITED = 1 << 60  # a cgroup's memory.max of "max"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _number(text: str | None, base: int = 10) -> int | None:
    try:
        return int(text, base) if text is not None else None
    except ValueError:
        return None


class Board:
    def __init__(self, root: str | Path = "/"):
        self.root = Path(root)

    # Where the values are is found once (a glob over sysfs is not free on a Pi); the values are read every time.
    @cached_property
    def _cpu_zone(self) -> Path | None:
        """The CPU's thermal zone (the first zone if none is named as the CPU's)."""
        zones = sorted(self.root.glob("sys/class/thermal/thermal_zone*"))
        named = [z for z in zones if _read(z / "type") in CPU_ZONES]
        return next(iter(named or zones), None)

    @cached_property
    def _throttled_file(self) -> Path | None:
        return next((path for pattern in THROTTLED_FILES for path in sorted(self.root.glob(pattern))), None)

    def temperature(self) -> float | None:
        """Degrees Celsius of the CPU's thermal zone."""
        millidegrees = _number(_read(self._cpu_zone / "temp")) if self._cpu_zone else None
        return millidegrees / 1000 if millidegrees is not None else None

    def throttle_flags(self) -> int | None:
        value = _read(self._throttled_file) if self._throttled_file else None
        return _number(value.removeprefix("throttled=").removeprefix("0x"), 16) if value else None

    def memory_available(self) -> int | None:
        """Bytes: the kernel's MemAvailable, or less if this process's cgroup (v2) has a limit closer by."""
        available = None
        for line in (_read(self.root / "proc/meminfo") or "").splitlines():
            if line.startswith("MemAvailable:"):
                available = _number(line.split()[1])
                available = available * 1024 if available is not None else None
        group = self._cgroup
        limit_text = _read(group / "memory.max")
        limit = UNLIMITED if limit_text == "max" else _number(limit_text)
        used = _number(_read(group / "memory.current"))
        if limit is not None and used is not None and limit < UNLIMITED:
            left = max(limit - used, 0)
            available = left if available is None else min(available, left)
        return available

    @cached_property
    def _cgroup(self) -> Path:
        """This process's cgroup v2 directory ("0::/kubepods/..."; "/" inside a container's own cgroup namespace)."""
        lines = (_read(self.root / "proc/self/cgroup") or "").splitlines()
        path = next((line[4:] for line in lines if line.startswith("0::/")), "")
        return self.root / "sys/fs/cgroup" / path

    def health(self, samples_per_second: float | None = None) -> pb.BoardHealth:
        msg = pb.BoardHealth()
        if (celsius := self.temperature()) is not None:
            msg.cpu_temperature_celsius = celsius
        if (flags := self.throttle_flags()) is not None:
            for name, bit in THROTTLE_BITS.items():
                setattr(msg, name, bool(flags >> bit & 1))
                setattr(msg, f"{name}_since_boot", bool(flags >> (bit + 16) & 1))
        if (available := self.memory_available()) is not None:
            msg.memory_available_bytes = available
        if samples_per_second is not None:
            msg.samples_per_second = samples_per_second
        return msg
