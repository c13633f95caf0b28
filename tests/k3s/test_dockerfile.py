"""The image cannot be built here (no Docker engine); these checks keep the Dockerfile in step with the code."""

from __future__ import annotations

import fnmatch
import re
import tomllib

from tests.conftest import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_every_python_package_is_copied_into_the_image():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {
        d.name
        for d in ROOT.iterdir()
        if (d / "__init__.py").is_file() and any(fnmatch.fnmatch(d.name, p) for p in patterns)
    }
    assert {"fedpi", "fedpi_cli", "worker_service", "coordinator_service", "generated"} <= packages
    copied = set(re.findall(r"^COPY (\S+) \1$", DOCKERFILE, re.M))
    assert packages <= copied, f"not copied into the image: {packages - copied}"
    # .dockerignore lets only what it names into the build context.
    allowed = {line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    assert packages <= allowed, f"left out of the build context by .dockerignore: {packages - allowed}"


def test_final_stage_is_slim_and_runs_as_non_root():
    final = DOCKERFILE.split("\nFROM ")[-1]
    assert final.startswith("python:${PYTHON_VERSION}-slim")
    assert re.search(r"^USER 10001", final, re.M)
    assert "COPY --from=build /opt/fedpi /opt/fedpi" in final
    assert "pip install" not in final and "apt-get" not in final


def test_manifests_run_as_the_image_user():
    from tests.k3s.conftest import render

    pods = [d for d in render("pi") if d["kind"] in ("StatefulSet", "Deployment")]
    assert len(pods) == 4
    for doc in pods:
        assert doc["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001


def test_the_image_installs_only_hash_pinned_cpu_builds():
    assert "pip install --require-hashes --no-deps -r /tmp/requirements.txt" in DOCKERFILE
    assert "COPY requirements/image-${TARGETARCH}.txt" in DOCKERFILE
    assert 'TORCH_SPEC="torch==2.9.1+cpu torchvision==0.24.1+cpu"' in DOCKERFILE
    arm64 = (ROOT / "requirements" / "image-arm64.txt").read_text()
    amd64 = (ROOT / "requirements" / "image-amd64.txt").read_text()
    assert "\ntorch==2.9.1 \\" in arm64 and "\ntorchvision==0.24.1 \\" in arm64
    for lock in (arm64, amd64):
        assert "nvidia" not in lock and "triton" not in lock and "cuda" not in lock
        pins = [line for line in lock.splitlines() if line and not line.startswith((" ", "#"))]
        assert all("==" in p and p.endswith("\\") for p in pins), pins
    assert "\ntorch==" not in amd64  # from the CPU index, by TORCH_SPEC


def test_the_locks_follow_pyproject():
    """Every runtime dependency of pyproject.toml is in both locks (run `make lock` after changing them)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    names = {re.split(r"[<>=!~ ]", d, maxsplit=1)[0].lower() for d in pyproject["project"]["dependencies"]}
    for arch in ("arm64", "amd64"):
        lock = (ROOT / "requirements" / f"image-{arch}.txt").read_text().lower()
        pinned = {line.split("==")[0] for line in lock.splitlines() if "==" in line and not line.startswith(" ")}
        expected = names - ({"torch", "torchvision"} if arch == "amd64" else set())
        assert expected <= pinned, f"{arch}: not pinned: {expected - pinned}"


def test_the_image_checks_its_cpu_before_starting():
    assert "FEDPI_PREFLIGHT=1" in DOCKERFILE.split("\nFROM ")[-1]
