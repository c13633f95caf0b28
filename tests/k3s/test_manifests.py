"""Every rendered manifest validates strictly against the Kubernetes 1.31 schemas, and says what we promise."""

from __future__ import annotations

import kubernetes_validate
import pytest

from tests.conftest import ROOT
from tests.k3s.conftest import OVERLAYS, find, find_all, render

KUBERNETES_VERSION = "1.31.0"


def test_there_are_pi_and_local_overlays():
    assert {"pi", "local"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_manifest_validates_strictly(overlay):
    docs = render(overlay)
    assert {d["kind"] for d in docs} >= {
        "Namespace",
        "ConfigMap",
        "Service",
        "StatefulSet",
        "Deployment",
        "PersistentVolumeClaim",
        "NetworkPolicy",
    }
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_a_typo_fails_strict_validation():
    """The check above can fail: an unknown field is refused."""
    job = find(render("local"), "Deployment")
    job["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_locked_down_and_probed_natively(overlay):
    docs = render(overlay)
    for doc in [d for d in docs if d["kind"] in ("StatefulSet", "Deployment")]:
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        container = pod["containers"][0]
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"]
        assert sc["allowPrivilegeEscalation"] is False
        assert container["resources"]["requests"]["memory"]
    worker = find_all(docs, "StatefulSet")[0]["spec"]["template"]["spec"]["containers"][0]
    config = find(docs, "ConfigMap", "fedpi-config")["data"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert worker[probe]["grpc"]["port"] == int(config["FEDPI_HEALTH_PORT"])


def test_settings_are_applied_in_one_place():
    docs = render("pi", "lab", "registry.example/fedpi", "1.2.3", "5")
    workers = find_all(docs, "StatefulSet")
    config = find(docs, "ConfigMap", "fedpi-config")
    assert [w["metadata"]["name"] for w in workers] == [f"fedpi-worker-{i}" for i in range(5)]
    assert all(w["spec"]["replicas"] == 1 for w in workers)
    assert config["data"]["FEDPI_PARTITION_COUNT"] == config["data"]["FEDPI_EXPECT_WORKERS"] == "5"
    assert {d["metadata"].get("namespace", d["metadata"]["name"]) for d in docs} == {"lab"}
    images = {
        c["image"]
        for d in docs
        if d["kind"] in ("StatefulSet", "Deployment")
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert images == {"registry.example/fedpi:1.2.3"}


def test_pi_overlay_puts_one_worker_on_each_arm64_pi():
    for workers in find_all(render("pi"), "StatefulSet"):
        pod = workers["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"kubernetes.io/arch": "arm64", "fedpi.io/worker": "true"}
        rule = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
        assert rule["topologyKey"] == "kubernetes.io/hostname"
        # against every worker, not only this StatefulSet's own pod
        assert rule["labelSelector"]["matchLabels"] == {"app.kubernetes.io/component": "worker"}


def test_each_worker_has_its_own_id_partition_and_selector_and_the_service_is_headless():
    docs = render("pi")
    for i, workers in enumerate(find_all(docs, "StatefulSet")):
        env = {e["name"]: e["value"] for e in workers["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env == {"FEDPI_ID": f"fedpi-worker-{i}", "FEDPI_PARTITION_INDEX": str(i)}
        assert workers["spec"]["selector"]["matchLabels"]["fedpi.io/worker-index"] == str(i)
    assert find(docs, "Service", "fedpi-worker")["spec"]["clusterIP"] == "None"


def _policy(docs, name):
    return next(d for d in find_all(docs, "NetworkPolicy") if d["metadata"]["name"] == name)["spec"]


def test_only_the_coordinator_reaches_the_workers_and_scrapers_only_metrics():
    docs = render("pi")
    policy = _policy(docs, "fedpi-worker-ingress")
    worker_labels = find_all(docs, "StatefulSet")[0]["spec"]["template"]["metadata"]["labels"]
    coordinator_labels = find(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["policyTypes"] == ["Ingress"]
    assert policy["podSelector"]["matchLabels"].items() <= worker_labels.items()
    grpc_rule, metrics_rule = policy["ingress"]
    [source] = grpc_rule["from"]
    assert [p["port"] for p in grpc_rule["ports"]] == ["grpc"]
    assert source["podSelector"]["matchLabels"].items() <= coordinator_labels.items()
    assert not source["podSelector"]["matchLabels"].items() <= worker_labels.items()
    assert "from" not in metrics_rule and [p["port"] for p in metrics_rule["ports"]] == ["metrics"]
    coordinator = _policy(docs, "fedpi-coordinator-ingress")
    assert coordinator["podSelector"]["matchLabels"].items() <= coordinator_labels.items()
    # the control API only from operator pods (and kubectl port-forward, from the node), the metrics from scrapers
    api_rule, metrics_rule = coordinator["ingress"]
    assert [p["port"] for p in api_rule["ports"]] == ["api"]
    [operators] = api_rule["from"]
    assert operators["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
    assert metrics_rule == {"ports": [{"port": "metrics", "protocol": "TCP"}]}


DNS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}


def test_egress_the_coordinator_reaches_workers_and_dns_and_workers_only_dns():
    docs = render("pi")
    worker_labels = find_all(docs, "StatefulSet")[0]["spec"]["template"]["metadata"]["labels"]
    coordinator_labels = find(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    grpc_port = int(
        find(docs, "ConfigMap", "fedpi-config")["data"].get("FEDPI_WORKERS_DNS", ":50051").rsplit(":", 1)[1]
    )
    coordinator = _policy(docs, "fedpi-coordinator-egress")
    assert coordinator["policyTypes"] == ["Egress"]
    assert coordinator["podSelector"]["matchLabels"].items() <= coordinator_labels.items()
    to_workers, to_dns = coordinator["egress"]
    [workers] = to_workers["to"]
    assert workers["podSelector"]["matchLabels"].items() <= worker_labels.items()
    assert to_workers["ports"] == [{"port": grpc_port, "protocol": "TCP"}]
    assert to_dns["to"] == [DNS] and {p["port"] for p in to_dns["ports"]} == {53}
    worker = _policy(docs, "fedpi-worker-egress")
    assert worker["podSelector"]["matchLabels"].items() <= worker_labels.items()
    assert worker["policyTypes"] == ["Egress"] and worker["egress"] == [to_dns]
    # the dataset download: HTTPS to public addresses only, never into the cluster or the LAN
    download = _policy(docs, "fedpi-dataset-download")
    [rule] = download["egress"]
    assert rule["ports"] == [{"port": 443, "protocol": "TCP"}]
    [block] = rule["to"]
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"} <= set(block["ipBlock"]["except"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_exposes_prometheus_metrics_where_the_config_says(overlay):
    docs = render(overlay)
    port = int(find(docs, "ConfigMap", "fedpi-config")["data"]["FEDPI_METRICS_PORT"])
    for doc in find_all(docs, "StatefulSet") + [find(docs, "Deployment")]:
        template = doc["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
        assert int(annotations["prometheus.io/port"]) == port
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert ports["metrics"] == port


def test_credentials_come_from_secrets_mounted_where_the_config_points():
    docs = render("pi")
    config = find(docs, "ConfigMap", "fedpi-config")["data"]
    pods = [(d, f"{d['metadata']['name']}-tls") for d in find_all(docs, "StatefulSet")]
    for doc, secret in [*pods, (find(docs, "Deployment"), "fedpi-coordinator-tls")]:
        pod = doc["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert volumes[mounts["/etc/fedpi/tls"]]["secret"]["secretName"] == secret
        assert volumes[mounts["/etc/fedpi/token"]]["secret"]["secretName"] == "fedpi-token"
    for key in ("FEDPI_TOKEN_FILE", "FEDPI_TLS_CERT", "FEDPI_TLS_KEY", "FEDPI_TLS_CA", "FEDPI_TLS_CLIENT_CA"):
        assert config[key].startswith(("/etc/fedpi/tls/", "/etc/fedpi/token/"))
    assert config["FEDPI_CLIENT_IDENTITY"] == "fedpi-coordinator"


def test_secrets_from_make_certs_validate_and_match_the_mounts(tmp_path):
    import yaml

    from fedpi.net import certs

    certs.make_all(tmp_path, workers=3)
    secrets = list(yaml.safe_load_all(certs.secrets_yaml(tmp_path, "lab", workers=3)))
    for secret in secrets:
        kubernetes_validate.validate(secret, KUBERNETES_VERSION, strict=True)
    docs = render("pi")
    mounted = {
        v["secret"]["secretName"]
        for d in docs
        if d["kind"] in ("StatefulSet", "Deployment")
        for v in d["spec"]["template"]["spec"]["volumes"]
        if "secret" in v
    }
    assert mounted == {s["metadata"]["name"] for s in secrets}


def test_no_worker_mounts_another_workers_key():
    for workers in find_all(render("pi"), "StatefulSet"):
        secrets = {v["secret"]["secretName"] for v in workers["spec"]["template"]["spec"]["volumes"] if "secret" in v}
        assert secrets == {f"{workers['metadata']['name']}-tls", "fedpi-token"}


def test_the_coordinator_is_placed_off_the_worker_pis():
    affinity = find(render("pi"), "Deployment")["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
    [term] = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term["matchExpressions"] == [{"key": "fedpi.io/worker", "operator": "NotIn", "values": ["true"]}]


def test_the_coordinator_is_one_service_that_keeps_its_runs_on_the_volume():
    docs = render("pi")
    deployment = find(docs, "Deployment", "fedpi-coordinator")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == [
        "python",
        "-m",
        "coordinator_service",
        "serve",
        "--state-dir",
        "/results",
        "--config",
        "/etc/fedpi/config/fedpi.toml",
    ]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/results"]["name"]]["persistentVolumeClaim"]["claimName"] == "fedpi-results"
    # the run settings' file is the ConfigMap made from k3s/base/fedpi.toml, mounted where the command reads it
    assert volumes[mounts["/etc/fedpi/config"]["name"]]["configMap"]["name"].startswith("fedpi-run-config")
    toml = find(docs, "ConfigMap", "fedpi-run-config")["data"]["fedpi.toml"]
    assert toml == (ROOT / "k3s" / "base" / "fedpi.toml").read_text()
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["FEDPI_API_CLIENT_IDENTITY"] == "fedpi-operator"
    assert volumes[mounts["/etc/fedpi/operator"]["name"]]["secret"]["secretName"] == "fedpi-operator-token"
    assert env["FEDPI_API_TOKEN_FILE"].startswith("/etc/fedpi/operator/")
    service = find(docs, "Service", "fedpi-coordinator")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"api": 50050, "metrics": 9090}
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert container["readinessProbe"]["tcpSocket"]["port"] == "api"
