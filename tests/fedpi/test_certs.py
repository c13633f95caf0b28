"""make certs: one certificate per worker naming only that worker, private files private from the first byte."""

from __future__ import annotations

import datetime
import os
import stat
from pathlib import Path

from cryptography import x509

from fedpi.net import certs


def _names(path: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return {
        str(n)
        for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName
        )
    }


def test_every_worker_gets_its_own_certificate_that_names_no_other_worker(tmp_path):
    certs.make_all(tmp_path, workers=3)
    names = {i: _names(tmp_path / f"fedpi-worker-{i}.crt") for i in range(3)}
    for i, own in names.items():
        assert f"fedpi-worker-{i}" in own and f"fedpi-worker-{i}.fedpi-worker.fedpi.svc" in own
        assert not any(f"fedpi-worker-{j}" in own for j in names if j != i)
        assert not any("*" in n for n in own)
    assert not (tmp_path / "worker.crt").exists()


def test_names_option_issues_for_workers_outside_kubernetes(tmp_path):
    certs.make_all(tmp_path, workers=0, names=["alice", "bob"])
    assert "alice" in _names(tmp_path / "alice.crt") and "bob" not in _names(tmp_path / "alice.crt")


def test_private_files_are_created_private_not_chmod_afterwards(tmp_path, monkeypatch):
    """Even with a permissive umask and chmod doing nothing, keys and the token are never readable by others."""
    monkeypatch.setattr(Path, "chmod", lambda self, mode: None)
    old = os.umask(0o000)
    try:
        certs.make_all(tmp_path, workers=1)
    finally:
        os.umask(old)
    for name in ("ca.key", "coordinator.key", "fedpi-worker-0.key", "token"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE((tmp_path / "ca.crt").stat().st_mode) & 0o004


def test_certificates_are_valid_from_two_days_ago_for_pis_without_a_clock(tmp_path):
    certs.make_all(tmp_path, workers=1)
    now = datetime.datetime.now(datetime.UTC)
    for name in ("ca.crt", "coordinator.crt", "fedpi-worker-0.crt"):
        cert = x509.load_pem_x509_certificate((tmp_path / name).read_bytes())
        assert now - cert.not_valid_before_utc >= datetime.timedelta(hours=47), name
