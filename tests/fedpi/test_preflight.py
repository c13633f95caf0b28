"""The start-up check: a training step in a child process, and one clear line when it dies."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedpi import preflight
from tests.conftest import ROOT

PI4 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU part\t: 0xd08
"""


def test_cpu_names_come_from_cpuinfo():
    assert preflight.describe_cpu(PI4) == "Cortex-A72 (Raspberry Pi 4), no LSE atomics"
    pi5 = PI4.replace("0xd08", "0xd0b").replace("cpuid", "cpuid atomics")
    assert preflight.describe_cpu(pi5) == "Cortex-A76 (Raspberry Pi 5)"
    assert preflight.describe_cpu("model name\t: Intel(R) Xeon(R)\n") == "Intel(R) Xeon(R)"


def test_a_working_torch_passes():
    assert preflight.check() is None


def test_a_torch_that_dies_with_sigill_gets_one_line_naming_cpu_torch_and_remedy(monkeypatch):
    monkeypatch.setattr(preflight, "_STEP", "import os, signal; os.kill(os.getpid(), signal.SIGILL)")
    line = preflight.check()
    assert line is not None and "\n" not in line
    assert "SIGILL" in line and f"torch {preflight.torch_version()}" in line and "2.9.1" in line
    assert "CPU (" in line


def test_the_worker_exits_non_zero_with_the_line_before_importing_torch(tmp_path):
    # A `torch` that kills its importer with SIGILL, first on the path: the worker must not die of it itself.
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGILL)\n")
    proc = subprocess.run(
        [sys.executable, "-m", "worker_service", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "FEDPI_PREFLIGHT": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == preflight.EXIT_UNSUPPORTED, proc.stderr
    assert proc.stderr.count("\n") == 1 and "died with SIGILL" in proc.stderr


@pytest.mark.parametrize("value", ["", "0"])
def test_the_check_runs_only_when_asked(monkeypatch, value):
    monkeypatch.setenv("FEDPI_PREFLIGHT", value)
    monkeypatch.setattr(preflight, "check", lambda: pytest.fail("ran"))
    preflight.run_if_asked()
