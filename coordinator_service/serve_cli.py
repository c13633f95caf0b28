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

from coordinator_service import settings as run_settings
from coordinator_service.control import launch, runspec
from coordinator_service.control.runspec import InvalidSpec, RunTarget, WorkerPolicy
from coordinator_service.engine.observer import RunObserver
from coordinator_service.observe.board import BoardWatch
from coordinator_service.observe.metrics import PrometheusObserver
from fedpi.logs import configure_logging
from fedpi.net.auth import SecurityFlags, ServerSecurity, accepted, exposure_warning, server_security
from fedpi.runtime import read_secret
from fedpi.task import DEFAULT_TASK, installed

log = structlog.get_logger()


API_FLAGS = SecurityFlags(
    "--api-token-file", "--api-tls-cert", "--api-tls-key", "--api-client-ca", "--api-client-identity"
)


def api_security(args: argparse.Namespace) -> tuple[ServerSecurity, str]:
    """The control API's security, and the warning to show when it is unsafe beyond loopback; refuses (ValueError)
    what is unsafe without --insecure."""
    security = server_security(
        API_FLAGS,
        token=read_secret(args.api_token_file, "--api-token-file") if args.api_token_file else None,
        cert=args.api_tls_cert,
        key=args.api_tls_key,
        client_ca=args.api_client_ca,
        client_identity=args.api_client_identity,
        client_role="an operator",
        server_role="coordinator",
        token_flag="fedpi runs --token-file",
    )
    return security, exposure_warning(args.host, args.port, security, API_FLAGS, args.insecure)


def server_runs(args: argparse.Namespace, worker_security) -> tuple[runspec.WorkerPolicy, RunTarget, str]:
    """The workers runs may reach, the default target, and a warning when the worker token goes in plaintext."""
    try:
        workers = runspec.parse_workers([w for w in (args.workers or "").split(",") if w.strip()], "--workers")
        dns = runspec.parse_address(args.workers_dns, "--workers-dns") if args.workers_dns else None
    except InvalidSpec as exc:
        raise ValueError(str(exc)) from None
    defaults = RunTarget(
        task=args.task,
        model=args.model or "",
        dataset=args.dataset or "",
        workers=workers,
        workers_dns=dns,
        expect_workers=args.expect_workers,
    )
    given = [w for w in args.allow_workers.split(",") if w.strip()]
    policy = (WorkerPolicy.parse(given) if given else runspec.LOOPBACK).including(defaults)
    beyond_loopback = bool(policy.names - {"localhost"}) or any(not n.is_loopback for n in policy.networks)
    plaintext_token = worker_security.token and not worker_security.tls and beyond_loopback
    problem = "the workers' token would cross the network in plaintext (add --tls-ca)" if plaintext_token else ""
    return policy, defaults, accepted(problem, args.insecure)


def allowed_tasks(args: argparse.Namespace) -> frozenset[str]:
    extra = {t.strip() for t in args.allow_task.split(",") if t.strip()}
    for name in extra:
        if not runspec.TASK_NAME.fullmatch(name):
            raise ValueError(f"--allow-task {name!r}: a task name or package.module:Class")
    return frozenset({DEFAULT_TASK, *installed(), args.task, *extra})


def serve_main(args: argparse.Namespace) -> int:
    from coordinator_service.control.manager import RunManager, ServerRuns
    from coordinator_service.control.runs import RunStore
    from coordinator_service.control.service import serve

    configure_logging(args.log_format)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        security, api_warning = api_security(args)
        worker_security = launch.client_security(
            args.token_file, args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name
        )
        policy, defaults, worker_warning = server_runs(args, worker_security)
        layer = {**getattr(args, "config_layer", {}), **run_settings.env_layer()}  # the file, then the environment
        run_settings.merge(run_settings.preset_layer(args.preset), layer)  # bad FEDPI_* settings stop us here
        config = ServerRuns(
            place=launch.RunPlace(
                output_dir=Path(args.state_dir),
                security=worker_security,
                data_dir=args.data_dir,
                download=not args.no_download,
                default_dataset=args.default_dataset,
                latest_link=Path(args.latest_link) if args.latest_link else None,
                keep_round_models=args.keep_round_models,
                discovery_timeout=args.discovery_timeout,
            ),
            defaults=defaults,
            preset=args.preset,
            layer=layer,
            allowed_tasks=allowed_tasks(args),
            workers=policy,
            max_workers=min(args.max_workers_per_run, run_settings.MAX_WORKERS),
            keep_runs=args.keep_runs,
            max_watchers=args.max_watchers,
            warning="; ".join(filter(None, (api_warning, worker_warning))),
        )
        observers: list[RunObserver] = [BoardWatch()]
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
