"""The client side of fedpi's channels: keepalive and retry options, and how a client proves itself and checks the
server (a bearer token, TLS, mutual TLS). The coordinator dials workers with them, an operator the coordinator."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import structlog

from fedpi.net.protocol import (
    AUTH_METADATA_KEY,
    PROTOCOL_VERSION,
    SERVICE_NAME,
    VERSION_METADATA_KEY,
)

log = structlog.get_logger()


# Transient UNAVAILABLE (a worker restarting, Wi-Fi hiccup) is retried by gRPC itself, with backoff, for the calls
# that are safe to repeat. Never Train: a repeated Train would train twice, and a lost one is the round's business.
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": SERVICE_NAME, "method": m} for m in ("GetInfo", "SetWeights", "GetWeights")],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.5s",
                    "maxBackoff": "5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


def channel_options(keepalive_seconds: float = 30.0, retry: bool = True) -> list[tuple[str, object]]:
    """Keepalive pings keep a quiet connection (a 10-minute Train on a slow Pi) open through NATs and idle timeouts,
    and find a dead peer within keepalive + 10 s. Workers accept pings this often (worker_service.server). Without
    `retry` (a person asking, `fedpi status`) a refused connection is an answer at once."""
    options: list[tuple[str, object]] = [
        ("grpc.keepalive_time_ms", int(keepalive_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    return options + (
        [("grpc.enable_retries", 1), ("grpc.service_config", _SERVICE_CONFIG)]
        if retry
        else [("grpc.enable_retries", 0)]
    )


@dataclass(frozen=True)
class ClientSecurity:
    """How the coordinator proves itself to workers and checks them: a bearer token, TLS, or mutual TLS."""

    token: str | None = field(default=None, repr=False)
    ca_file: Path | None = None  # verify workers' certificates against this CA (turns TLS on)
    cert_file: Path | None = None  # with key_file: our client certificate (mutual TLS)
    key_file: Path | None = None
    server_name: str | None = None  # the name worker certificates carry when they are dialled by IP address
    # With TLS: each worker's certificate must name the worker id it reports in GetInfo, so that one worker's
    # certificate cannot stand in for another's.
    verify_worker_id: bool = True

    @property
    def tls(self) -> bool:
        return self.ca_file is not None

    def for_name(self, name: str) -> ClientSecurity:
        """The same settings, expecting `name` on the worker's certificate."""
        return replace(self, server_name=name)

    def channel(self, address: str, options: list) -> grpc.aio.Channel:
        if self.ca_file is None:
            return grpc.aio.insecure_channel(address, options=options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes(),
            private_key=self.key_file.read_bytes() if self.key_file else None,
            certificate_chain=self.cert_file.read_bytes() if self.cert_file else None,
        )
        if self.server_name:
            options = [*options, ("grpc.ssl_target_name_override", self.server_name)]
        return grpc.aio.secure_channel(address, credentials, options=options)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        version = ((VERSION_METADATA_KEY, PROTOCOL_VERSION),)
        return version + ((AUTH_METADATA_KEY, f"Bearer {self.token}"),) if self.token else version
