"""Board health read from a fake sysfs/procfs tree: what a Raspberry Pi shows, and what a laptop does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker_service.board import Board


def fake_pi(root: Path, *, throttled: str = "0x50005", cgroup: bool = True) -> Path:
    files = {
        "sys/class/thermal/thermal_zone0/type": "gpu-thermal\n",
        "sys/class/thermal/thermal_zone0/temp": "39000\n",
        "sys/class/thermal/thermal_zone1/type": "cpu-thermal\n",
        "sys/class/thermal/thermal_zone1/temp": "71540\n",
        "sys/devices/platform/soc/soc:firmware/get_throttled": f"{throttled}\n",
        "proc/meminfo": "MemTotal:        3884000 kB\nMemFree:          120000 kB\nMemAvailable:    2000000 kB\n",
    }
    if cgroup:
        files |= {
            "proc/self/cgroup": "0::/kubepods/pod-a/worker\n",
            "sys/fs/cgroup/kubepods/pod-a/worker/memory.max": f"{1024 * 2**20}\n",
            "sys/fs/cgroup/kubepods/pod-a/worker/memory.current": f"{900 * 2**20}\n",
        }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_a_pi_reports_its_cpu_temperature_throttling_and_the_memory_its_cgroup_leaves(tmp_path):
    health = Board(fake_pi(tmp_path)).health(samples_per_second=812.5)
    assert health.cpu_temperature_celsius == pytest.approx(71.54)  # the CPU's zone, not the first one
    # 0x50005: under-voltage and throttled now (bits 0, 2), both since boot too (bits 16, 18)
    assert (health.under_voltage, health.frequency_capped, health.throttled, health.soft_temperature_limit) == (
        True,
        False,
        True,
        False,
    )
    assert (health.under_voltage_since_boot, health.throttled_since_boot) == (True, True)
    assert not health.frequency_capped_since_boot and not health.soft_temperature_limit_since_boot
    assert health.memory_available_bytes == 124 * 2**20  # the cgroup's 1024 - 900 MiB, below MemAvailable
    assert health.samples_per_second == 812.5


def test_flags_since_boot_alone_and_memory_without_a_cgroup_limit(tmp_path):
    health = Board(fake_pi(tmp_path, throttled="throttled=0x50000", cgroup=False)).health()
    assert not health.throttled and not health.under_voltage
    assert health.throttled_since_boot and health.under_voltage_since_boot
    assert health.memory_available_bytes == 2_000_000 * 1024
    assert not health.HasField("samples_per_second")


def test_what_a_board_cannot_read_stays_absent(tmp_path):
    assert Board(tmp_path).health().ListFields() == []  # a laptop in a bare container: nothing, not zeros
    fake_pi(tmp_path, throttled="garbage")
    (tmp_path / "sys/class/thermal/thermal_zone1/temp").write_text("n/a\n")
    health = Board(tmp_path).health()
    assert not health.HasField("throttled") and not health.HasField("under_voltage_since_boot")
    assert not health.HasField("cpu_temperature_celsius")  # the CPU's zone is unreadable: no other zone stands in
    assert health.HasField("memory_available_bytes")


def test_status_says_a_boards_health_in_a_few_words(tmp_path):
    from coordinator_service.observe.board import board_summary

    health = Board(fake_pi(tmp_path, throttled="0x50004")).health(samples_per_second=810.2)
    assert board_summary(health) == (
        "71.5°C, under-voltage since boot, [red]throttled[/red], 124 MiB free, 810 samples/s"
    )
    assert board_summary(health, brief=True) == "71.5°C [red]throttled[/red]"
    assert board_summary(Board(tmp_path / "laptop").health()) == ""


def test_the_coordinator_logs_a_boards_trouble_when_it_starts_and_when_it_ends():
    from structlog.testing import capture_logs

    from coordinator_service.observe.board import BoardWatch
    from generated.fedpi.v1 import worker_pb2 as pb

    watch = BoardWatch()
    hot = pb.BoardHealth(cpu_temperature_celsius=81.0, throttled=True, soft_temperature_limit=True)
    with capture_logs() as logs:
        for health in (
            pb.BoardHealth(cpu_temperature_celsius=60.0),
            hot,
            hot,
            pb.BoardHealth(throttled_since_boot=True),
        ):
            watch.worker_progress("alice", pb.TrainProgress(health=health))
        watch.worker_progress("bob", pb.TrainProgress())  # a laptop: nothing to say
    assert [(e["event"], e["worker"], e["conditions"], e.get("cpu_temperature_celsius")) for e in logs] == [
        ("worker_board_trouble", "alice", ["throttled", "soft_temperature_limit"], 81.0),
        ("worker_board_recovered", "alice", ["throttled", "soft_temperature_limit"], None),
    ]
