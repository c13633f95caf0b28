"""Only an authenticated client may use a fedpi server: a bearer token and/or a client certificate (mutual TLS).
A worker admits its coordinator; the coordinator's control API admits operators.

The health service stays open, so kubelet probes and load balancers need no credentials; it reveals nothing but
SERVING / NOT_SERVING. Tokens are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import ipaddress
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog

from fedpi.net.handlers import wrap_handler
from fedpi.net.protocol import AUTH_METADATA_KEY

log = structlog.get_logger()

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


@dataclass(frozen=True)
class ServerSecurity:
    token: str | None = field(default=None, repr=False)
    cert_file: Path | None = None  # with key_file: serve TLS
    key_file: Path | None = None
    client_ca_file: Path | None = None  # require client certificates signed by this CA (mutual TLS)
    client_identity: str | None = None  # with mutual TLS: the only certificate name (CN or SAN) allowed to call
    client_role: str = "the coordinator"  # who that is, for refusals
    server_role: str = "worker"
    token_flag: str = "--token-file"  # the client's flag that sends the token

    @property
    def tls(self) -> bool:
        return self.cert_file is not None

    def credentials(self) -> grpc.ServerCredentials:
        if self.key_file is None or self.cert_file is None:
            raise ValueError("TLS needs a certificate and its key (--tls-cert, --tls-key)")
        return grpc.ssl_server_credentials(
            [(self.key_file.read_bytes(), self.cert_file.read_bytes())],
            root_certificates=self.client_ca_file.read_bytes() if self.client_ca_file else None,
            require_client_auth=self.client_ca_file is not None,
        )


def is_loopback(host: str) -> bool:
    """Whether a listen address is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class SecurityFlags:
    """What a server's security options are called on its command line, for the messages that name them."""

    token_file: str = "--token-file"
    cert: str = "--tls-cert"
    key: str = "--tls-key"
    client_ca: str = "--tls-client-ca"
    client_identity: str = "--client-identity"


def server_security(
    flags: SecurityFlags,
    *,
    token: str | None,
    cert: str | None,
    key: str | None,
    client_ca: str | None,
    client_identity: str | None,
    **roles: str,
) -> ServerSecurity:
    """A server's security from its options (files by path, the token already read), checked as a whole: both
    services build theirs here. ValueError naming the flags when they do not fit together."""
    if bool(cert) != bool(key):
        raise ValueError(f"{flags.cert} and {flags.key} go together")
    if client_ca and not cert:
        raise ValueError(f"mutual TLS ({flags.client_ca}) needs {flags.cert} and {flags.key}")
    if client_identity and not client_ca:
        raise ValueError(f"{flags.client_identity} needs mutual TLS ({flags.client_ca})")
    security = ServerSecurity(
        token=token,
        cert_file=Path(cert) if cert else None,
        key_file=Path(key) if key else None,
        client_ca_file=Path(client_ca) if client_ca else None,
        client_identity=client_identity,
        **roles,
    )
    for f in (security.cert_file, security.key_file, security.client_ca_file):
        if f is not None and not f.is_file():
            raise ValueError(f"{f}: no such file")
    return security


def exposure_warning(host: str, port: int, security: ServerSecurity, flags: SecurityFlags, insecure: bool) -> str:
    """ "" when `security` is safe on host:port; what is unsafe when `insecure` accepts it; else ValueError."""
    problem = exposure(
        host,
        port,
        security,
        token_hint=f"add {flags.cert} and {flags.key}",
        auth_hint=f"add {flags.token_file} with {flags.cert}/{flags.key}, or {flags.client_ca}",
    )
    return accepted(problem, insecure)


def accepted(problem: str, insecure: bool) -> str:
    """The warning for an unsafe way of serving that --insecure accepts ("" if nothing is unsafe); else ValueError."""
    if problem and not insecure:
        raise ValueError(f"refusing to serve: {problem}; or pass --insecure to accept that")
    return f"--insecure: {problem}" if problem else ""


def exposure(host: str, port: int, security: ServerSecurity, token_hint: str, auth_hint: str) -> str:
    """What is unsafe about serving `security` on host:port ("" if nothing): beyond loopback, a server wants a token
    with TLS, or mutual TLS. The hints name the flags that fix it."""
    if is_loopback(host):
        return ""
    where = f"{host}:{port}"
    if security.token is not None and not security.tls:
        return f"the bearer token would cross the network in plaintext on {where} ({token_hint})"
    if security.client_ca_file is None and security.token is None:
        return f"anyone who reaches {where} could use this {security.server_role} ({auth_hint})"
    return ""


def _refusal(security: ServerSecurity, context: grpc.aio.ServicerContext) -> tuple[grpc.StatusCode, str] | None:
    if security.token is not None:
        presented = dict(context.invocation_metadata() or ()).get(AUTH_METADATA_KEY, "")
        scheme, _, token = presented.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return grpc.StatusCode.UNAUTHENTICATED, (
                f"missing bearer token: send metadata 'authorization: Bearer <token>' "
                f"({security.client_role}: {security.token_flag}; grpcurl: -H 'authorization: Bearer ...')"
            )
        if not hmac.compare_digest(token.encode(), security.token.encode()):
            return grpc.StatusCode.UNAUTHENTICATED, (
                f"invalid bearer token: use the token this {security.server_role} was given"
            )
    if security.client_identity is not None:
        auth = context.auth_context()
        names = {n.decode() for key in ("x509_common_name", "x509_subject_alternative_name") for n in auth.get(key, ())}
        if security.client_identity not in names:
            return grpc.StatusCode.PERMISSION_DENIED, (
                f"client certificate {sorted(names) or 'absent'} is not allowed: only "
                f"{security.client_identity!r} ({security.client_role}) may call this {security.server_role}"
            )
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks credentials before any method but health checks (reflection included) runs."""

    def __init__(self, security: ServerSecurity):
        self.security = security

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIXES):
            return handler
        return _guarded(handler, self.security, handler_call_details.method)


def _guarded(handler: grpc.RpcMethodHandler, security: ServerSecurity, method: str) -> grpc.RpcMethodHandler:
    @asynccontextmanager
    async def checked(context: grpc.aio.ServicerContext):
        refusal = _refusal(security, context)
        if refusal is not None:
            log.warning("request_refused", method=method, code=refusal[0].name, peer=context.peer())
            await context.abort(*refusal)
        yield

    return wrap_handler(handler, checked)
