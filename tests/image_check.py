"""make image-test: build the image, check its size, run a worker and a coordinator container as the manifests do
(non-root, read-only root filesystem), train one round, probe the worker with grpcurl, and stop everything. Last,
build examples/tabular/Dockerfile FROM it, as a user adds a task, and train that task in the derived image.

  python -m tests.image_check [--platform linux/amd64|linux/arm64] [--torch-wheel PATH] [--budget-mb N]

Then a coordinator on this machine (this venv's torch) trains one more round against the container's worker (the
image's torch): the wire format does not depend on the torch version. Needs podman (or docker) and the base image.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from coordinator_service.local import free_port, wait_serving
from fedpi.data import write_idx
from tests.conftest import ROOT
from tests.integration.conftest import events, run_coordinator

BUDGET_MB = {"linux/arm64": 1200, "linux/amd64": 1300}
USER = "10001:10001"


def engine(platform: str) -> list[str]:
    for name in ("podman", "docker"):
        if shutil.which(name):
            # podman-here keeps arm64 images in a store of their own, so both can carry the same base tag.
            arm64 = name == "podman" and platform == "linux/arm64"
            return [name, *shlex.split(os.environ.get("PODMAN_ARM64_STORE", "") if arm64 else "")]
    sys.exit("image-test: neither podman nor docker is installed")


def sh(*args: str, check: bool = True, capture: bool = True) -> str:
    proc = subprocess.run(args, capture_output=capture, text=True)
    if check and proc.returncode:
        output = proc.stdout[-3000:] + proc.stderr[-3000:] if capture else "(its output is above)"
        sys.exit(f"image-test: {' '.join(args)} failed ({proc.returncode}):\n{output}")
    return proc.stdout if capture else ""


def torchvision_wheel(torch_version: str) -> Path:
    """The torchvision release made for this torch (0.N+15 for 2.N), from PyPI into wheels/ unless it is there: the
    image holds torchvision as the real build does, so a task installed FROM it finds fedpi's dependencies met."""
    minor = int(torch_version.split(".")[1])
    found = sorted((ROOT / "wheels").glob(f"torchvision-0.{minor + 15}.*-cp311-*x86_64.whl"))
    if found:
        return found[-1]
    sh(
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.11",
        "--platform",
        "manylinux_2_28_x86_64",
        "-d",
        str(ROOT / "wheels"),
        f"torchvision==0.{minor + 15}.*",
    )
    return torchvision_wheel(torch_version)


def build(eng: list[str], platform: str, tag: str, torch_wheel: str | None) -> float:
    args = [*eng, "build", *shlex.split(os.environ.get("PODMAN_BUILD_FLAGS", "")), "--platform", platform, "-t", tag]
    copied = None
    if torch_wheel:
        copied = ROOT / "wheels" / Path(torch_wheel).name
        if not copied.exists():
            shutil.copy(torch_wheel, copied)
        version = Path(torch_wheel).name.split("-")[1]
        vision = torchvision_wheel(version)
        args += [
            "--build-arg",
            "TORCH_WHEELS=1",
            "--build-arg",
            f"TORCH_SPEC=torch=={version} torchvision=={vision.name.split('-')[1]}",
        ]
    started = time.monotonic()
    sh(*args, str(ROOT), capture=False)
    print(f"image-test  built {tag} for {platform} in {time.monotonic() - started:.0f} s")
    size = int(sh(*eng, "image", "inspect", "--format", "{{.Size}}", tag).strip()) / 1e6
    return size


def pull_mb(eng: list[str], tag: str) -> float:
    """The image saved and gzipped as registries compress layers: about what a Pi pulls."""
    proc = subprocess.Popen([*eng, "save", tag], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    gzip = zlib.compressobj(6, zlib.DEFLATED, 31)
    total = 0
    while block := proc.stdout.read(1 << 20):
        total += len(gzip.compress(block))
    total += len(gzip.flush())
    proc.wait()
    return total / 1e6


def synthetic_mnist(root: Path) -> None:
    """Random 28x28 digits in MNIST's IDX files (the image test checks plumbing, not accuracy)."""
    gen = np.random.default_rng(0)
    for prefix, n in (("train", 600), ("t10k", 200)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", gen.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", gen.integers(0, 10, n, dtype=np.uint8))


RUN_ARGS: list[str] = []  # --run-args: e.g. an emulated CPU's /proc/cpuinfo for arm64 under qemu


def check_task_image(eng: list[str], platform: str, tag: str) -> None:
    """A user's task installed FROM the image (examples/tabular/Dockerfile, as docs/tasks.md shows), then three local
    workers and a coordinator in one container of it, with the manifests' restrictions, train two rounds."""
    task_tag = f"{tag}-tabular"
    started = time.monotonic()
    sh(
        *eng,
        "build",
        *shlex.split(os.environ.get("PODMAN_BUILD_FLAGS", "")),
        "--platform",
        platform,
        "--build-arg",
        f"FEDPI_IMAGE={tag}",
        "-t",
        task_tag,
        str(ROOT / "examples" / "tabular"),
        capture=False,
    )
    listed = sh(
        *eng, "run", *RUN_ARGS, "--rm", "--entrypoint", "python", task_tag, "-m", "coordinator_service", "tasks"
    )
    assert "breast-cancer" in listed, listed
    with tempfile.TemporaryDirectory() as empty:
        run = run_container(
            eng,
            task_tag,
            f"fedpi-image-test-task-{free_port()}",
            Path(empty),
            [
                "coordinator_service",
                "demo",
                "--rounds",
                "2",
                "--output-dir",
                "/tmp/run",
                "--log-format",
                "json",
                "--startup-timeout",
                "900",
            ],  # three workers starting at once under qemu take minutes
            detach=False,
        )
    finished = [e for e in events(run.stdout) if e.get("event") == "round_finished"]
    if run.returncode or len(finished) != 2:
        sys.exit(f"image-test: the breast-cancer task image failed:\n{run.stdout[-3000:]}{run.stderr[-2000:]}")
    print(
        f"image-test  {task_tag} (FROM the image, FEDPI_TASK=breast-cancer) built and trained 2 rounds in "
        f"{time.monotonic() - started:.0f} s: test accuracy {finished[-1]['test_accuracy']:.4f}"
    )


def run_container(
    eng: list[str], tag: str, name: str, data: Path, command: list[str], detach: bool, results: Path | None = None
) -> subprocess.CompletedProcess:
    mounts = ["-v", f"{data}:/data:ro"] + (["-v", f"{results}:/results"] if results else [])
    return subprocess.run(
        [
            *eng,
            "run",
            *RUN_ARGS,
            *(["-d"] if detach else []),
            "--rm",
            "--name",
            name,
            "--network",
            "host",
            "--read-only",
            "--tmpfs",
            "/tmp",
            "--user",
            USER,
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            *mounts,
            "--entrypoint",
            "python",
            tag,
            "-m",
            *command,
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )


def rss_mb(eng: list[str], name: str) -> float:
    """Resident memory of the container's processes (its main process and, behind an --init, its children)."""
    root = int(sh(*eng, "inspect", "--format", "{{.State.Pid}}", name).strip())
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    members = {root}
    for _ in range(5):  # a few levels of children are plenty
        members |= {pid for pid, ppid in parents.items() if ppid in members}
    total = 0
    for pid in members:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total / 1024


def grpcurl(*args: str) -> str:
    binary = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    return subprocess.run([binary, "-plaintext", *args], capture_output=True, text=True, timeout=60, check=True).stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--platform", default="linux/amd64")
    p.add_argument("--torch-wheel", help="a CPU torch wheel to build with instead of the PyTorch CPU index (amd64)")
    p.add_argument("--budget-mb", type=float, help="largest image size accepted (default by platform)")
    p.add_argument("--no-build", action="store_true", help="use an image built before")
    p.add_argument("--run-args", default="", help="extra arguments for every container run")
    args = p.parse_args()
    RUN_ARGS.extend(shlex.split(args.run_args))
    eng = engine(args.platform)
    tag = f"localhost/fedpi:image-test-{args.platform.split('/')[1]}"
    if args.no_build:
        size = int(sh(*eng, "image", "inspect", "--format", "{{.Size}}", tag).strip()) / 1e6
    else:
        size = build(eng, args.platform, tag, args.torch_wheel)
    budget = args.budget_mb or BUDGET_MB[args.platform]
    print(f"image-test  image size {size:.0f} MB on disk (budget {budget:.0f} MB), {pull_mb(eng, tag):.0f} MB gzipped")
    if size > budget:
        sys.exit(f"image-test: the image is {size:.0f} MB, over its budget of {budget:.0f} MB")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, results = tmp / "data", tmp / "results"
        data.mkdir()
        results.mkdir(mode=0o777)
        os.chmod(results, 0o777)  # written by the image's user 10001
        synthetic_mnist(data)
        port, health = free_port(), free_port()
        worker = f"fedpi-image-test-worker-{port}"
        started = time.monotonic()
        proc = run_container(
            eng,
            tag,
            worker,
            data,
            [
                "worker_service",
                "--id",
                "pi-1",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--health-port",
                str(health),
                "--dataset",
                "mnist",
                "--no-download",
                "--partition",
                "0/1",
            ],
            detach=True,
        )
        if proc.returncode:
            sys.exit(f"image-test: the worker container did not start:\n{proc.stderr}")
        try:
            asyncio.run(wait_serving(f"127.0.0.1:{health}", None, timeout=900))
            print(
                f"image-test  worker container SERVING {time.monotonic() - started:.1f} s after start, "
                f"RSS {rss_mb(eng, worker):.0f} MB"
            )
            services = grpcurl(f"127.0.0.1:{port}", "list")
            assert "fedpi.v1.Worker" in services and "grpc.health.v1.Health" in services, services
            assert json.loads(grpcurl(f"127.0.0.1:{health}", "grpc.health.v1.Health/Check")) == {"status": "SERVING"}
            info = json.loads(grpcurl(f"127.0.0.1:{port}", "fedpi.v1.Worker/GetInfo"))
            print(
                f"image-test  grpcurl list: {', '.join(services.split())}; health SERVING; worker torch "
                f"{info['torch_version']} on {info['cpu_architecture']}"
            )
            coordinator = run_container(
                eng,
                tag,
                f"fedpi-image-test-coordinator-{port}",
                data,
                [
                    "coordinator_service",
                    "train",
                    "--workers",
                    f"pi-1=127.0.0.1:{port}",
                    "--rounds",
                    "1",
                    "--dataset",
                    "mnist",
                    "--no-download",
                    "--local-batches",
                    "5",
                    "--output-dir",
                    "/results/run",
                    "--log-format",
                    "json",
                ],
                detach=False,
                results=results,
            )
            finished = [e for e in events(coordinator.stdout) if e.get("event") == "round_finished"]
            if coordinator.returncode or not finished:
                sys.exit(
                    f"image-test: the coordinator container failed:\n{coordinator.stdout[-3000:]}"
                    f"{coordinator.stderr[-2000:]}"
                )
            print(
                f"image-test  coordinator container finished round 1: wall {finished[0]['wall_seconds']:.2f} s, "
                f"samples {finished[0]['samples']}; {results}/run/model.pt written: "
                f"{(results / 'run' / 'model.pt').is_file()}"
            )
            host = run_coordinator(
                "train",
                "--workers",
                f"pi-1=127.0.0.1:{port}",
                "--rounds",
                "1",
                "--dataset",
                "mnist",
                "--data-dir",
                str(data),
                "--no-download",
                "--local-batches",
                "5",
                "--output-dir",
                str(tmp / "host"),
                timeout=1800,
            )
            if host.returncode:
                sys.exit(f"image-test: this machine's coordinator failed:\n{host.stdout[-3000:]}")
            print(
                f"image-test  coordinator with torch {torch.__version__} (this machine) and worker with torch "
                f"{info['torch_version']} (the image) finished a round"
            )
        finally:
            sh(*eng, "stop", "-t", "15", worker, check=False)
    check_task_image(eng, args.platform, tag)
    print("image-test  passed")


if __name__ == "__main__":
    main()
