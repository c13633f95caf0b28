"""python -m fedpi.net.certs --out certs --workers 3 [--names alice,bob,charlie] [--san 192.168.1.21 ...]

Creates what a secured fedpi deployment needs, in --out:
  ca.crt, ca.key                 a private certificate authority (keep ca.key offline)
  coordinator.crt, .key          CN fedpi-coordinator: the client certificate workers allow (--client-identity), and
                                 the server certificate of the coordinator's control API (its Service name
                                 fedpi-coordinator.NAMESPACE.svc, localhost and 127.0.0.1: `make train` reaches it
                                 through kubectl port-forward)
  operator.crt, .key             client certificate, CN fedpi-operator: who may use the control API (fedpi runs)
  fedpi-worker-0.crt, .key, ...  one server certificate per worker, naming only that worker's id (the k3s pod name,
                                 or each of --names), its pod DNS names and fedpi-worker: the coordinator checks
                                 that a worker's certificate names the id it reports, so one Pi's key cannot stand
                                 in for another's
  token                          a random bearer token (the coordinator's, for workers)
  operator-token                 another, for the control API
Certificates are valid from two days in the past: a Raspberry Pi has no real-time clock, and until NTP has synced
its clock can lag behind the machine that made them.
With --print-secrets it then prints them as the Kubernetes Secrets the k3s manifests mount.
Existing files are kept, so running it again only adds what is missing.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

COORDINATOR_IDENTITY = "fedpi-coordinator"
OPERATOR_IDENTITY = "fedpi-operator"
WORKER_SERVICE = "fedpi-worker"
VALID_DAYS = 825
# A Pi boots with the time it saved at shutdown (fake-hwclock) until NTP answers.
CLOCK_SKEW = datetime.timedelta(days=2)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpi"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for n in dict.fromkeys(names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            entries.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(entries)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Private files are created 0600: never readable by others, not even for a moment."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _ec_key(key: object) -> ec.EllipticCurvePrivateKey:
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SystemExit(f"{key!r}: the CA key must be an elliptic-curve key, as this tool writes them")
    return key


def make_ca(out: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    crt, key = out / "ca.crt", out / "ca.key"
    if crt.exists() and key.exists():
        return (
            x509.load_pem_x509_certificate(crt.read_bytes()),
            _ec_key(serialization.load_pem_private_key(key.read_bytes(), password=None)),
        )
    private = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedpi CA"))
        .issuer_name(_name("fedpi CA"))
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(private, hashes.SHA256())
    )
    _write(crt, cert.public_bytes(serialization.Encoding.PEM))
    _write(key, _key_pem(private), private=True)
    return cert, private


def issue(
    out: Path,
    stem: str,
    cn: str,
    names: list[str],
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    server: bool,
    client: bool,
) -> Path:
    """Sign a certificate for `cn` with SANs `names`; skip if stem.crt exists already."""
    crt = out / f"{stem}.crt"
    if crt.exists():
        return crt
    ca_cert, ca_key = ca
    private = ec.generate_private_key(ec.SECP256R1())
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    )
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(_san([cn, *names]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(out / f"{stem}.key", _key_pem(private), private=True)
    _write(crt, cert.public_bytes(serialization.Encoding.PEM))
    return crt


def worker_names(workers: int, names: list[str] | None = None) -> list[str]:
    """The worker ids certificates are issued for: --names, or the k3s pod names fedpi-worker-0, -1, ..."""
    return list(names) if names else [f"{WORKER_SERVICE}-{i}" for i in range(workers)]


def make_all(
    out: Path, workers: int, extra_sans: Sequence[str] = (), namespace: str = "fedpi", names: list[str] | None = None
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ca = make_ca(out)
    local = ["localhost", "127.0.0.1", *extra_sans]
    api = [
        f"{COORDINATOR_IDENTITY}.{namespace}",
        f"{COORDINATOR_IDENTITY}.{namespace}.svc",
        f"{COORDINATOR_IDENTITY}.{namespace}.svc.cluster.local",
        *local,
    ]
    issue(out, "coordinator", COORDINATOR_IDENTITY, api, ca, server=True, client=True)
    issue(out, "operator", OPERATOR_IDENTITY, [], ca, server=False, client=True)
    for name in worker_names(workers, names):
        pod = [
            f"{name}.{WORKER_SERVICE}",
            f"{name}.{WORKER_SERVICE}.{namespace}.svc",
            f"{name}.{WORKER_SERVICE}.{namespace}.svc.cluster.local",
        ]
        # WORKER_SERVICE too: the coordinator dials workers by IP before it knows who answers, expecting that name
        # (--tls-server-name); it then reconnects expecting the worker id the worker reports, which only this
        # certificate names.
        issue(out, name, name, [*pod, WORKER_SERVICE, *local], ca, server=True, client=False)
    for token in (out / "token", out / "operator-token"):
        if not token.exists():
            _write(token, (secrets.token_urlsafe(32) + "\n").encode(), private=True)


def secret_files(out: Path, workers: int) -> dict[str, dict[str, Path]]:
    """The Kubernetes Secrets the manifests mount, key by key (k3s/base: /etc/fedpi/tls, /etc/fedpi/token): one
    TLS Secret per worker pod, so that each Pi holds only its own key."""
    secrets_ = {"fedpi-token": {"token": out / "token"}, "fedpi-operator-token": {"token": out / "operator-token"}}
    for name in worker_names(workers):
        secrets_[f"{name}-tls"] = {
            "ca.crt": out / "ca.crt",
            "tls.crt": out / f"{name}.crt",
            "tls.key": out / f"{name}.key",
        }
    secrets_["fedpi-coordinator-tls"] = {
        "ca.crt": out / "ca.crt",
        "tls.crt": out / "coordinator.crt",
        "tls.key": out / "coordinator.key",
    }
    return secrets_


def secrets_yaml(out: Path, namespace: str, workers: int) -> str:
    """The Secrets as a YAML stream for `kubectl apply -f -`."""
    import base64
    import json

    docs = []
    for name, files in secret_files(out, workers).items():
        data = {key: base64.b64encode(path.read_bytes()).decode() for key, path in files.items()}
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/name": "fedpi"}},
            "data": data,
        }
        docs.append(json.dumps(secret, indent=2))  # JSON is YAML
    return "\n---\n".join(docs) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fedpi.net.certs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="certs", help="directory to write into")
    p.add_argument("--workers", type=int, default=3, help="how many worker certificates (fedpi-worker-0, ...)")
    p.add_argument(
        "--names",
        help="comma-separated worker ids to issue certificates for instead (workers run "
        "outside Kubernetes with --id NAME)",
    )
    p.add_argument("--san", action="append", default=[], help="extra DNS name or IP for worker certificates")
    p.add_argument("--namespace", default="fedpi", help="Kubernetes namespace the worker certificate is valid in")
    p.add_argument(
        "--print-secrets",
        action="store_true",
        help="then print them as Kubernetes Secrets of --namespace (YAML, for kubectl apply -f -)",
    )
    args = p.parse_args(argv)
    names = [n.strip() for n in args.names.split(",") if n.strip()] if args.names else None
    make_all(Path(args.out), args.workers, args.san, args.namespace, names)
    if args.print_secrets:
        sys.stdout.write(secrets_yaml(Path(args.out), args.namespace, args.workers))
    else:
        print(f"certificates and token in {args.out}/ (keep ca.key and token secret)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
