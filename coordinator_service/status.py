"""`fedpi status`: every worker's GetInfo as one table (or JSON), for a person checking a cluster by hand."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

# What answers a person's question needs (grpc, rich) is imported when it is asked, so --help answers at once.
STATES = {1: "idle", 2: "training"}  # worker.proto's WorkerState, by number


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", help="NAME=HOST:PORT,... (a bare HOST:PORT is named after itself)")
    p.add_argument("--workers-dns", help="instead of --workers: HOST:PORT resolving to every worker")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds each worker gets to answer")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    g = p.add_argument_group("security (as for training)")
    for flag, text in (
        ("--token-file", "bearer token file"),
        ("--tls-ca", "CA to verify workers with"),
        ("--tls-cert", "client certificate (mutual TLS)"),
        ("--tls-key", "its key"),
        ("--tls-server-name", "name on the workers' certificates when dialling by IP"),
    ):
        g.add_argument(flag, help=text)


async def gather_info(workers: list[tuple[str, str]], security, timeout: float) -> list[tuple[str, str, object]]:
    """(name, address, WorkerInfo or the error) for every worker, asked at once, once: a refused port answers at
    once."""
    from coordinator_service.engine.worker_client import WorkerClient
    from coordinator_service.engine.worker_errors import WorkerError

    async def ask(name: str, address: str):
        client = WorkerClient(name, address, rpc_timeout=timeout, security=security, retry=False)
        try:
            return name, address, await client.get_info()
        except WorkerError as exc:
            return name, address, exc
        finally:
            await client.close()

    return await asyncio.gather(*(ask(n, a) for n, a in workers))


def table(rows: list[tuple[str, str, object]]):
    from rich.table import Table

    from coordinator_service.observe.board import board_summary
    from generated.fedpi.v1 import worker_pb2 as pb

    t = Table(title="fedpi workers")
    columns = ("worker", "address", "id", "state", "round", "model", "shard", "protocol", "fedpi", "torch", "arch")
    for column in (*columns, "board"):
        t.add_column(column)
    for name, address, info in rows:
        if not isinstance(info, pb.WorkerInfo):
            t.add_row(name, address, "", "[red]unreachable[/red]", *[""] * 8)
            continue
        shard = f"{info.train_samples}/{info.test_samples} {info.dataset} {info.partition}"
        t.add_row(
            name,
            address,
            info.worker_id,
            STATES.get(info.state, "?"),
            str(info.weights_round),
            info.model_architecture,
            shard,
            info.protocol_version,
            info.software_version,
            info.torch_version,
            info.cpu_architecture,
            board_summary(info.health),
        )
    return t


async def _main(args: argparse.Namespace, security) -> int:
    from google.protobuf.json_format import MessageToDict
    from rich.console import Console

    from coordinator_service.engine.discovery import discover, parse_workers
    from generated.fedpi.v1 import worker_pb2 as pb

    if bool(args.workers) == bool(args.workers_dns):
        raise ValueError("give either --workers NAME=HOST:PORT,... or --workers-dns HOST:PORT")
    workers = parse_workers(args.workers) if args.workers else await discover(args.workers_dns, 1, args.timeout)
    rows = await gather_info(workers, security, args.timeout)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "worker": n,
                        "address": a,
                        **(MessageToDict(i) if isinstance(i, pb.WorkerInfo) else {"error": str(i)}),
                    }
                    for n, a, i in rows
                ],
                indent=2,
            )
        )
    else:
        # Piped (a file, `less`, a test): wide enough for every column, not 80 characters.
        console = Console() if sys.stdout.isatty() else Console(width=220)
        console.print(table(rows))
        for name, _, info in rows:
            if not isinstance(info, pb.WorkerInfo):
                console.print(f"{name}: {info}", highlight=False)
            elif info.warning:
                console.print(f"{name}: warning: {info.warning}", highlight=False)
    return 0 if all(isinstance(i, pb.WorkerInfo) for _, _, i in rows) else 1


def main(argv: list[str] | None = None) -> int:
    from fedpi.cli import Parser

    p = Parser(prog="fedpi status", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    from coordinator_service.control.launch import client_security  # the same flags and checks as training

    try:
        return asyncio.run(
            _main(
                args, client_security(args.token_file, args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
            )
        )
    except ValueError as exc:
        print(f"fedpi status: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `fedpi status --json | head`
        from fedpi.cli import broken_pipe

        return broken_pipe()
