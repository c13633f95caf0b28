"""Protocol versioning: both sides name their version, and incompatibility is caught before any weights move."""

from __future__ import annotations

import fedpi

PROTOCOL_VERSION = "1.13"
# Call metadata key in which a coordinator states the protocol it speaks.
VERSION_METADATA_KEY = "fedpi-protocol-version"
SERVICE_NAME = "fedpi.v1.Worker"
# Weight transfers get a deadline that grows with their size, on both ends: a Pi on Wi-Fi moves at least this many
# bytes a second.
MIN_TRANSFER_BYTES_PER_SECOND = 256 * 1024
# Call metadata key of the coordinator's bearer token: "Bearer <token>".
AUTH_METADATA_KEY = "authorization"


class ProtocolMismatch(Exception):
    """The two ends speak incompatible protocol versions."""


def _major(version: str) -> int:
    try:
        return int(version.split(".", 1)[0])
    except ValueError:
        raise ProtocolMismatch(
            f"unreadable protocol version {version!r}; expected MAJOR.MINOR, e.g. {PROTOCOL_VERSION}"
        ) from None


def check_compatible(*, coordinator: str, worker: str) -> None:
    """Raise ProtocolMismatch unless the major versions agree (minor versions only add fields)."""
    if _major(coordinator) == _major(worker):
        return
    newer, older = ("coordinator", "worker") if _major(coordinator) > _major(worker) else ("worker", "coordinator")
    raise ProtocolMismatch(
        f"protocol mismatch: coordinator speaks fedpi protocol {coordinator}, worker speaks {worker} "
        f"(this side is fedpi {fedpi.__version__}); upgrade the {older} to a fedpi release that speaks "
        f"protocol {max(coordinator, worker, key=_major)}, or run a {newer} that speaks "
        f"{min(coordinator, worker, key=_major)}"
    )


def _minor(version: str) -> int:
    try:
        return int(version.split(".", 1)[1])
    except (IndexError, ValueError):
        return 0


def check_minimum(version: str, minimum: str, needed_for: str) -> None:
    """Raise ProtocolMismatch if `version` (same major) is older than `minimum`, which `needed_for` requires."""
    if (_major(version), _minor(version)) < (_major(minimum), _minor(minimum)):
        raise ProtocolMismatch(
            f"the worker speaks fedpi protocol {version}, older than {minimum}, which this coordinator needs for "
            f"{needed_for}; upgrade the worker to a fedpi release that speaks protocol {PROTOCOL_VERSION}"
        )
