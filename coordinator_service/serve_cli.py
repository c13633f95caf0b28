"""`fedpi serve`: its flags, and the checks that keep a long-running coordinator safe to leave running.

Safe by default: it listens on loopback only. Any other address needs authentication (a token with TLS, or mutual
TLS) or an explicit --insecure, which the log and every ListRuns then show. Runs may use only the tasks and reach only
the worker hosts the operator allows.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import structlog
import torch

from coordinator_service import launch, runspec
from coordinator_service import settings as run_settings
from coordinator_service.metrics import PrometheusObserver
from coordinator_service.observe import RunObserver
from coordinator_service.runspec import InvalidSpec, RunTarget, WorkerPolicy
from fedpi.auth import ServerSecurity, exposure
from fedpi.cli import add_task_arguments, read_secret
from fedpi.logs import LOG_FORMATS, configure_logging
from fedpi.task import DEFAULT_TASK, installed

log = structlog.get_logger()


def worker_security_arguments(g) -> None:
    """How the coordinator proves itself to workers and checks them: `train`'s, `demo`'s and `serve`'s."""
    g.add_argument("--token-file", help="file holding the bearer token workers require")
    g.add_argument("--tls-ca", help="CA certificate to verify workers with; turns TLS on")
    g.add_argument("--tls-cert", help="client certificate, for workers that require mutual TLS")
    g.add_argument("--tls-key", help="private key of --tls-cert")
    g.add_argument("--tls-server-name", help="name on the workers' certificates when dialling them by IP address")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="address the control API listens on; beyond loopback it needs --api-token-file with TLS, "
                        "mutual TLS, or --insecure")
    p.add_argument("--port", type=int, default=50050)
    p.add_argument("--insecure", action="store_true",
                   help="allow what is unsafe beyond loopback: no authentication, a token in plaintext (shown in "
                        "the log and in every ListRuns)")
    p.add_argument("--state-dir", default="coordinator-state",
                   help="every run's record, events, metrics, checkpoints and models go under STATE_DIR/runs/")
    p.add_argument("--keep-round-models", type=int, default=5,
                   help="keep the global model of each run's last N rounds (GetModel with a round)")
    p.add_argument("--keep-runs", type=int, default=100,
                   help="keep the newest N finished runs and delete older ones (0: keep every run)")
    p.add_argument("--latest-link", help="point this symlink at each run's directory when it starts")
    g = p.add_argument_group("defaults of every run (a RunSpec's fields win; run settings come from FEDPI_* "
                             "variables, e.g. FEDPI_LR)")
    add_task_arguments(g, default_dataset="auto")
    g.add_argument("--preset", choices=list(run_settings.PRESETS), default="default",
                   help="the run settings' starting configuration")
    g.add_argument("--workers", help="NAME=HOST:PORT,... for runs that name none")
    g.add_argument("--workers-dns", help="HOST:PORT resolving to every worker, for runs that name none")
    g.add_argument("--expect-workers", type=int, default=0, help="with --workers-dns: how many to wait for")
    g.add_argument("--discovery-timeout", type=float, default=600.0,
                   help="with workers_dns: seconds a run waits for its workers to appear")
    g = p.add_argument_group("what runs may use")
    g.add_argument("--allow-task", default="",
                   help="tasks a RunSpec may name besides the installed ones (fedpi tasks) and --task: "
                        "NAME or package.module:Class, comma-separated")
    g.add_argument("--allow-workers", default="",
                   help="hosts runs may reach besides --workers / --workers-dns: IP addresses, CIDR networks and DNS "
                        "names, comma-separated (e.g. 10.0.0.0/24,fedpi-worker; default: loopback only)")
    g.add_argument("--max-workers-per-run", type=int, default=64, help="the most workers one run may name")
    g = p.add_argument_group("the control API's own security (operators)")
    g.add_argument("--api-token-file", help="operators must send this bearer token (file contents)")
    g.add_argument("--api-tls-cert", help="serve the API over TLS with this certificate")
    g.add_argument("--api-tls-key", help="private key of --api-tls-cert")
    g.add_argument("--api-client-ca", help="require operator certificates signed by this CA (mutual TLS)")
    g.add_argument("--api-client-identity", help="with mutual TLS: the only certificate name allowed to call")
    g.add_argument("--max-concurrent-rpcs", type=int, default=64, help="calls served at once; more are refused")
    g.add_argument("--max-watchers", type=int, default=16, help="WatchRun streams open at once")
    worker_security_arguments(
        p.add_argument_group("how runs reach the workers (the same flags as `train`; never part of a RunSpec)"))
    p.add_argument("--threads", type=int, default=0, help="torch threads for evaluation (0: torch's default)")
    p.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics of the runs (0: off)")
    p.add_argument("--metrics-host", default="127.0.0.1")
    p.add_argument("--log-format", choices=LOG_FORMATS, default="auto")


def api_security(args: argparse.Namespace) -> tuple[ServerSecurity, str]:
    """The control API's security, and the warning to show when it is unsafe beyond loopback; refuses (ValueError)
    what is unsafe without --insecure."""
    if bool(args.api_tls_cert) != bool(args.api_tls_key):
        raise ValueError("--api-tls-cert and --api-tls-key go together")
    if (args.api_client_ca or args.api_client_identity) and not args.api_tls_cert:
        raise ValueError("mutual TLS (--api-client-ca, --api-client-identity) needs --api-tls-cert and --api-tls-key")
    path = lambda value: Path(value) if value else None  # noqa: E731
    security = ServerSecurity(
        token=read_secret(args.api_token_file, "--api-token-file") if args.api_token_file else None,
        cert_file=path(args.api_tls_cert), key_file=path(args.api_tls_key),
        client_ca_file=path(args.api_client_ca), client_identity=args.api_client_identity,
        client_role="an operator", server_role="coordinator", token_flag="fedpi runs --token-file")
    problem = exposure(args.host, args.port, security, token_hint="add --api-tls-cert and --api-tls-key",
                       auth_hint="add --api-token-file with --api-tls-cert/--api-tls-key, or --api-client-ca")
    if not problem:
        return security, ""
    if not args.insecure:
        raise ValueError(f"refusing to serve: {problem}; or pass --insecure to accept that")
    return security, f"--insecure: {problem}"


def server_runs(args: argparse.Namespace, worker_security) -> tuple[runspec.WorkerPolicy, RunTarget, str]:
    """The workers runs may reach, the default target, and a warning when the worker token goes in plaintext."""
    try:
        workers = runspec.parse_workers([w for w in (args.workers or "").split(",") if w.strip()], "--workers")
        dns = runspec.parse_address(args.workers_dns, "--workers-dns") if args.workers_dns else None
    except InvalidSpec as exc:
        raise ValueError(str(exc)) from None
    defaults = RunTarget(task=args.task, model=args.model or "", dataset=args.dataset or "", workers=workers,
                         workers_dns=dns, expect_workers=args.expect_workers)
    given = [w for w in args.allow_workers.split(",") if w.strip()]
    policy = (WorkerPolicy.parse(given) if given else runspec.LOOPBACK).including(defaults)
    beyond_loopback = bool(policy.names - {"localhost"}) or any(not n.is_loopback for n in policy.networks)
    warning = ""
    if worker_security.token and not worker_security.tls and beyond_loopback:
        problem = "the workers' token would cross the network in plaintext (add --tls-ca)"
        if not args.insecure:
            raise ValueError(f"refusing to serve: {problem}; or pass --insecure to accept that")
        warning = f"--insecure: {problem}"
    return policy, defaults, warning


def allowed_tasks(args: argparse.Namespace) -> frozenset[str]:
    extra = {t.strip() for t in args.allow_task.split(",") if t.strip()}
    for name in extra:
        if not runspec.TASK_NAME.fullmatch(name):
            raise ValueError(f"--allow-task {name!r}: a task name or package.module:Class")
    return frozenset({DEFAULT_TASK, *installed(), args.task, *extra})


def serve_main(args: argparse.Namespace) -> int:
    from coordinator_service.runs import RunStore
    from coordinator_service.service import RunManager, ServerRuns, serve

    configure_logging(args.log_format)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        security, api_warning = api_security(args)
        worker_security = launch.client_security(args.token_file, args.tls_ca, args.tls_cert, args.tls_key,
                                                 args.tls_server_name)
        policy, defaults, worker_warning = server_runs(args, worker_security)
        layer = run_settings.env_layer()
        run_settings.merge(run_settings.preset_layer(args.preset), layer)  # bad FEDPI_* settings stop us here
        config = ServerRuns(
            place=launch.RunPlace(output_dir=Path(args.state_dir), security=worker_security, data_dir=args.data_dir,
                                  download=not args.no_download, default_dataset=args.default_dataset,
                                  latest_link=Path(args.latest_link) if args.latest_link else None,
                                  keep_round_models=args.keep_round_models,
                                  discovery_timeout=args.discovery_timeout),
            defaults=defaults, preset=args.preset, layer=layer, allowed_tasks=allowed_tasks(args), workers=policy,
            max_workers=min(args.max_workers_per_run, run_settings.MAX_WORKERS), keep_runs=args.keep_runs,
            max_watchers=args.max_watchers, warning="; ".join(filter(None, (api_warning, worker_warning))))
        observers: list[RunObserver] = []
        if args.metrics_port:
            metrics = PrometheusObserver()
            metrics.serve(args.metrics_port, args.metrics_host)
            observers.append(metrics)
        store = RunStore(Path(args.state_dir))
        store.retain(args.keep_runs)
    except (ValueError, OSError) as exc:
        log.error("coordinator_failed_to_start", reason=str(exc))
        return 2

    async def main_loop() -> None:
        manager = RunManager(store, config, observers=observers)
        await serve(manager, f"{args.host}:{args.port}", security, max_concurrent_rpcs=args.max_concurrent_rpcs)

    try:
        asyncio.run(main_loop())
    except OSError as exc:
        log.error("coordinator_failed_to_start", reason=str(exc))
        return 2
    return 0
