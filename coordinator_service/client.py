"""`fedpi runs`: talk to a coordinator serving the control API (`coordinator serve`).

  fedpi runs list
  fedpi runs start --workers alice=10.0.0.11:50051,... --rounds 10 --set lr=0.1 --watch
  fedpi runs get RUN | watch RUN [--from-start] | stop RUN [--abandon-round] | resume RUN [--watch]
  fedpi runs model RUN [--round N] [-o model.pt]

--coordinator HOST:PORT (or FEDPI_COORDINATOR) says where; --token-file and --tls-* how to prove who you are.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import grpc
from google.protobuf import json_format

from coordinator_service.worker_client import ClientSecurity
from fedpi import serde
from fedpi.cli import read_secret
from fedpi.protocol import AUTH_METADATA_KEY
from generated.fedpi.v1 import coordinator_pb2 as cpb
from generated.fedpi.v1 import coordinator_pb2_grpc as cpb_grpc

STATE_NAMES = {value: name.removeprefix("RUN_STATE_").lower() for name, value in cpb.RunState.items()}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fedpi runs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--coordinator", default=os.environ.get("FEDPI_COORDINATOR", "127.0.0.1:50050"),
                   help="HOST:PORT of the control API [env FEDPI_COORDINATOR]")
    p.add_argument("--token-file", help="the operator token (the server's --api-token-file)")
    p.add_argument("--tls-ca", help="CA that signed the coordinator's API certificate; turns TLS on")
    p.add_argument("--tls-cert", help="operator certificate, when the API requires mutual TLS")
    p.add_argument("--tls-key", help="private key of --tls-cert")
    p.add_argument("--tls-server-name", help="name on the coordinator's certificate, when dialling it by address")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds for each call but watch and model")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every run, newest first")
    for name in ("get", "watch", "stop", "resume", "model"):
        cmd = sub.add_parser(name)
        cmd.add_argument("run_id")
        if name in ("watch",):
            cmd.add_argument("--from-start", action="store_true", help="every event so far first")
        if name == "stop":
            cmd.add_argument("--abandon-round", action="store_true",
                             help="stop at once, losing the round in progress (default: after it)")
        if name == "resume":
            cmd.add_argument("--watch", action="store_true", help="then follow the run to its end")
        if name == "model":
            cmd.add_argument("--round", type=int, default=0, help="a kept round's model (default: the latest)")
            cmd.add_argument("-o", "--output", default="model.pt", help="where to save the state_dict")
    start = sub.add_parser("start", help="start a run; prints its id")
    start.add_argument("--run-id", default="")
    start.add_argument("--task", default="")
    start.add_argument("--model", default="")
    start.add_argument("--dataset", default="")
    start.add_argument("--rounds", type=int, default=0)
    start.add_argument("--workers", default="", help="NAME=HOST:PORT,...")
    start.add_argument("--workers-dns", default="")
    start.add_argument("--expect-workers", type=int, default=0)
    start.add_argument("--preset", default="", help="the run settings' starting configuration (default, seed)")
    start.add_argument("--set", action="append", default=[], metavar="SETTING=VALUE",
                       help="a run setting (the names of `fedpi train --help`'s setting flags), e.g. --set lr=0.1 "
                            "--set federated-evaluation=true")
    start.add_argument("--watch", action="store_true", help="then follow the run to its end")
    return p.parse_args(argv)


def _channel(args: argparse.Namespace) -> grpc.aio.Channel:
    path = lambda value: Path(value) if value else None  # noqa: E731
    security = ClientSecurity(ca_file=path(args.tls_ca), cert_file=path(args.tls_cert), key_file=path(args.tls_key),
                              server_name=args.tls_server_name)
    return security.channel(args.coordinator, [])


def _spec(args: argparse.Namespace) -> cpb.RunSpec:
    settings = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: use FLAG=VALUE, e.g. --set lr=0.1")
        settings[key.strip()] = value.strip()
    return cpb.RunSpec(run_id=args.run_id, task=args.task, model=args.model, dataset=args.dataset, rounds=args.rounds,
                       workers=[w for w in args.workers.split(",") if w], workers_dns=args.workers_dns,
                       expect_workers=args.expect_workers, settings=settings, preset=args.preset)


def _row(run: cpb.Run) -> str:
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime(run.started_at)) if run.started_at else ""
    accuracy = f"{run.test_accuracy:.2%}" if run.round else "-"
    return (f"{run.run_id:<24} {STATE_NAMES[run.state]:<12} {run.round:>3}/{run.rounds:<4} {accuracy:>8}  "
            f"{started}  {run.error}").rstrip()


async def _watch(stub, run_id: str, from_start: bool, metadata) -> int:
    async for event in stub.WatchRun(cpb.WatchRunRequest(run_id=run_id, from_start=from_start), metadata=metadata):
        print(event.json, flush=True)
    run = await stub.GetRun(cpb.GetRunRequest(run_id=run_id), metadata=metadata)
    print(f"run {run.run_id} {STATE_NAMES[run.state]} after round {run.round} of {run.rounds}"
          + (f", test accuracy {run.test_accuracy:.2%}" if run.round else "") + (f": {run.error}" if run.error else ""),
          file=sys.stderr)
    return 0 if run.state == cpb.RUN_STATE_FINISHED else 1


async def _model(stub, args, metadata) -> int:
    """Download, check the digest and the manifest as a worker would, save as a state_dict."""
    stream = stub.GetModel(cpb.GetModelRequest(run_id=args.run_id, round=args.round), metadata=metadata)
    header, payload = None, bytearray()
    async for chunk in stream:
        if chunk.HasField("header"):
            header = chunk.header
        else:
            payload += chunk.data.data
    if header is None:
        print("fedpi runs model: the stream had no header", file=sys.stderr)
        return 1
    try:
        state = serde.state_dict_from_payload(header, payload)  # the digest and sizes, checked
    except serde.WeightsError as exc:
        print(f"fedpi runs model: {exc}", file=sys.stderr)
        return 1
    import torch

    torch.save(state, args.output)
    print(f"{args.output}: run {args.run_id} round {header.round}, model {header.model_architecture}, "
          f"{len(payload) / 1e6:.1f} MB, {header.digest}")
    return 0


async def run(args: argparse.Namespace) -> int:
    metadata = ((AUTH_METADATA_KEY, f"Bearer {read_secret(args.token_file, '--token-file')}"),) \
        if args.token_file else ()
    async with _channel(args) as channel:
        stub = cpb_grpc.CoordinatorStub(channel)
        t = args.timeout
        if args.command == "list":
            print(f"{'RUN':<24} {'STATE':<12} {'ROUND':<8} {'ACCURACY':>8}  STARTED (UTC)     ERROR")
            token = ""
            while True:  # every page
                runs = await stub.ListRuns(cpb.ListRunsRequest(page_token=token), metadata=metadata, timeout=t)
                for r in runs.runs:
                    print(_row(r))
                if runs.warning and not token:
                    print(f"warning: the coordinator says: {runs.warning}", file=sys.stderr)
                token = runs.next_page_token
                if not token:
                    return 0
        if args.command == "get":
            run = await stub.GetRun(cpb.GetRunRequest(run_id=args.run_id), metadata=metadata, timeout=t)
            print(json_format.MessageToJson(run, preserving_proto_field_name=True))
            return 0
        if args.command == "watch":
            return await _watch(stub, args.run_id, args.from_start, metadata)
        if args.command == "stop":
            run = await stub.StopRun(cpb.StopRunRequest(run_id=args.run_id, abandon_round=args.abandon_round),
                                     metadata=metadata, timeout=t)
            print(f"run {run.run_id}: stopping " + ("now" if args.abandon_round else f"after round {run.round + 1}"))
            return 0
        if args.command == "model":
            return await _model(stub, args, metadata)
        if args.command == "start":
            run = await stub.StartRun(_spec(args), metadata=metadata, timeout=t)
        else:
            run = await stub.ResumeRun(cpb.ResumeRunRequest(run_id=args.run_id), metadata=metadata, timeout=t)
        print(run.run_id, flush=True)
        return await _watch(stub, run.run_id, True, metadata) if args.watch else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return asyncio.run(run(args))
    except BrokenPipeError:  # `fedpi runs list | head`
        sys.stderr.close()
        return 0
    except grpc.aio.AioRpcError as exc:
        print(f"fedpi runs {args.command}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"fedpi runs {args.command}: {exc}", file=sys.stderr)
        return 2
