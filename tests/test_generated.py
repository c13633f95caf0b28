"""generated/ must be exactly what `make proto` produces from proto/."""

from __future__ import annotations

import filecmp
import subprocess
import sys

from tests.conftest import ROOT


def test_generated_code_is_up_to_date(tmp_path):
    protos = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "proto").rglob("*.proto"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Igenerated=proto",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            *protos,
        ],
        cwd=ROOT,
        check=True,
    )
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert fresh, "protoc produced nothing"
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, ROOT / p, shallow=False)]
    assert not stale, f"generated/ is stale against proto/ ({stale}): run `make proto` and commit the result"
