"""The direction of imports (pyproject.toml's [tool.importlinter] contracts) holds, and breaks loudly when a module
reaches the wrong way: each planted import below fails the contract that forbids it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fedpi", "coordinator_service", "worker_service", "fedpi_cli", "generated")
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "400"}  # one contract per line
    return subprocess.run(
        [str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_code_keeps_every_contract():
    out = lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


@pytest.mark.parametrize(
    ("module", "planted", "contract"),
    [
        (
            "coordinator_service/engine/rounds.py",
            "import worker_service.servicer",
            "the worker and the coordinator never import each other",
        ),
        ("fedpi/weights/serde.py", "import coordinator_service.settings", "fedpi is the shared base"),
        ("coordinator_service/policy/strategy.py", "import coordinator_service.engine.rounds", "coordinator layers"),
        (
            "coordinator_service/control/service.py",
            "import coordinator_service.cli",
            "no library module imports a command line",
        ),
        (
            "coordinator_service/observe/progress.py",
            "import coordinator_service.__main__",
            "a service's __main__ only parses and calls",
        ),
        ("worker_service/trainer.py", "import worker_service.servicer", "worker layers"),
    ],
)
def test_a_planted_import_breaks_its_contract(tmp_path, module, planted, contract):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{planted}  # planted\n")
    out = lint(tmp_path)
    assert out.returncode != 0, out.stdout
    broken = [line for line in out.stdout.splitlines() if line.endswith("BROKEN")]
    assert any(contract in line for line in broken), out.stdout
