"""The image cannot be built here (no Docker engine); these checks keep the Dockerfile in step with the code."""

from __future__ import annotations

import re
import tomllib

from tests.conftest import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_every_python_package_is_copied_into_the_image():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = set(re.findall(r"^COPY (\S+) \1$", DOCKERFILE, re.M))
    assert packages <= copied, f"not copied into the image: {packages - copied}"


def test_final_stage_is_slim_and_runs_as_non_root():
    final = DOCKERFILE.split("\nFROM ")[-1]
    assert final.startswith("python:${PYTHON_VERSION}-slim")
    assert re.search(r"^USER 10001", final, re.M)
    assert "COPY --from=build /opt/fedpi /opt/fedpi" in final
    assert "pip install" not in final and "apt-get" not in final


def test_manifests_run_as_the_image_user():
    from tests.k3s.conftest import render

    pods = [d for d in render("pi") if d["kind"] in ("StatefulSet", "Job")]
    assert len(pods) == 4
    for doc in pods:
        assert doc["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001
