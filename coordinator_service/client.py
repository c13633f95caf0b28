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
import datetime
import json
import os
import sys
import time
from pathlib import Path

from fedpi.cli import Parser

STATE_NAMES = {
    0: "unspecified",
    1: "queued",
    2: "training",
    3: "finished",
    4: "failed",
    5: "stopped",
    6: "interrupted",
}  # coordinator.proto's RunState, by number (grpc is imported only to call)
OUTPUTS = ("table", "json", "yaml")


def _connection_arguments(p: argparse.ArgumentParser, suppress: bool) -> None:
    """--coordinator and the credentials: before the subcommand (`fedpi runs --coordinator H:P list`) or after it
    (`fedpi runs list --coordinator H:P`), where users put them."""
    default = (lambda value: argparse.SUPPRESS) if suppress else (lambda value: value)  # noqa: E731
    p.add_argument(
        "--coordinator",
        default=default(os.environ.get("FEDPI_COORDINATOR", "127.0.0.1:50050")),
        help="HOST:PORT of the control API [env FEDPI_COORDINATOR]",
    )
    p.add_argument("--token-file", default=default(None), help="the operator token (the server's --api-token-file)")
    p.add_argument(
        "--tls-ca", default=default(None), help="CA that signed the coordinator's API certificate; turns TLS on"
    )
    p.add_argument("--tls-cert", default=default(None), help="operator certificate, when the API requires mutual TLS")
    p.add_argument("--tls-key", default=default(None), help="private key of --tls-cert")
    p.add_argument(
        "--tls-server-name",
        default=default(None),
        help="name on the coordinator's certificate, when dialling it by address",
    )
    p.add_argument("--timeout", type=float, default=default(30.0), help="seconds for each call but watch and model")


def add_arguments(p: argparse.ArgumentParser) -> None:
    _connection_arguments(p, suppress=False)
    connection = Parser(add_help=False, epilog=None)
    _connection_arguments(connection, suppress=True)
    sub = p.add_subparsers(dest="runs_command", required=True, metavar="COMMAND", parser_class=Parser)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".", parents=[connection])

    listing = command("list", "every run, newest first")
    listing.add_argument("-o", "--output", choices=OUTPUTS, default="table", help="how to print the runs")
    for name, text in (
        ("get", "one run's whole record"),
        ("watch", "follow a run's events to its end"),
        ("stop", "stop a training run"),
        ("resume", "continue a stopped, failed or interrupted run"),
        ("model", "download a run's model, its digest checked"),
    ):
        cmd = command(name, text)
        cmd.add_argument("run_id", help="the run's id (fedpi runs list)")
        if name == "get":
            cmd.add_argument("-o", "--output", choices=OUTPUTS, default="table", help="how to print the run")
        if name == "watch":
            cmd.add_argument("--from-start", action="store_true", help="every event so far first")
        if name == "stop":
            cmd.add_argument(
                "--abandon-round",
                action="store_true",
                help="stop at once, losing the round in progress (default: after it)",
            )
        if name == "resume":
            cmd.add_argument("--watch", action="store_true", help="then follow the run to its end")
        if name == "model":
            cmd.add_argument("--round", type=int, default=0, help="a kept round's model (0: the latest)")
            cmd.add_argument("-o", "--output", default="model.pt", help="where to save the state_dict")
    start = command("start", "start a run; prints its id")
    start.add_argument("--run-id", default="", help="the run's id (default: the UTC time)")
    start.add_argument("--task", default="", help="what to train (default: the server's)")
    start.add_argument("--model", default="", help="the built-in task's model (default: the server's)")
    start.add_argument("--dataset", default="", help="the built-in task's dataset (default: the server's)")
    start.add_argument("--rounds", type=int, default=0, help="rounds (0: the server's default)")
    start.add_argument("--workers", default="", help="NAME=HOST:PORT,... (default: the server's)")
    start.add_argument("--workers-dns", default="", help="HOST:PORT resolving to every worker")
    start.add_argument("--expect-workers", type=int, default=0, help="with --workers-dns: how many to wait for")
    start.add_argument("--preset", default="", help="the run settings' starting configuration (default, seed)")
    start.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SETTING=VALUE",
        help="a run setting (the names of `fedpi train --help`'s setting flags), e.g. --set lr=0.1 "
        "--set federated-evaluation=true",
    )
    start.add_argument("--watch", action="store_true", help="then follow the run to its end")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="fedpi runs", description=__doc__)
    add_arguments(p)
    return p.parse_args(argv)


def _channel(args: argparse.Namespace):
    from fedpi.net.client import ClientSecurity

    path = lambda value: Path(value) if value else None  # noqa: E731
    security = ClientSecurity(
        ca_file=path(args.tls_ca),
        cert_file=path(args.tls_cert),
        key_file=path(args.tls_key),
        server_name=args.tls_server_name,
    )
    return security.channel(args.coordinator, [])


def _spec(args: argparse.Namespace):
    from generated.fedpi.v1 import coordinator_pb2 as cpb

    settings = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: use FLAG=VALUE, e.g. --set lr=0.1")
        settings[key.strip()] = value.strip()
    return cpb.RunSpec(
        run_id=args.run_id,
        task=args.task,
        model=args.model,
        dataset=args.dataset,
        rounds=args.rounds,
        workers=[w for w in args.workers.split(",") if w],
        workers_dns=args.workers_dns,
        expect_workers=args.expect_workers,
        settings=settings,
        preset=args.preset,
    )


def _date(seconds: float) -> str:
    """An epoch time as an ISO 8601 date in UTC ('' for 0: not yet)."""
    if not seconds:
        return ""
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def as_dict(run, summary: bool = False) -> dict:
    """A Run as plain data for -o json|yaml: states by name, times as dates, the JSON fields parsed. A summary (what
    ListRuns sends) leaves out what it does not carry, rather than show it empty."""
    from google.protobuf import json_format

    out = json_format.MessageToDict(run, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    for field in ("spec", "failures", "last_round_json", "settings_json") if summary else ():
        out.pop(field, None)
    out["state"] = STATE_NAMES[run.state]
    out["started_at"], out["ended_at"] = _date(run.started_at), _date(run.ended_at)
    for field, name in (("last_round_json", "last_round"), ("settings_json", "settings")):
        text = out.pop(field, "")
        if text:
            out[name] = json.loads(text)
    for field in ("round", "rounds"):
        out[field] = int(out.get(field, 0))
    return out


def _print(data, output: str) -> None:
    if output == "json":
        print(json.dumps(data, indent=2))
    else:
        import yaml

        print(yaml.safe_dump(data, sort_keys=False).rstrip())


HEADER = f"{'RUN':<24} {'STATE':<12} {'ROUND':<8} {'ACCURACY':>8}  {'WORKERS':<16} STARTED (UTC)     ERROR"


def _workers(run) -> str:
    """'3/3', or '2/3 1 refused': of the workers the run knows, how many trained in its last round."""
    if not run.workers:
        return "-"
    trained = sum(w.state == "trained" for w in run.workers)
    others: dict[str, int] = {}
    for w in run.workers:
        if w.state != "trained":
            others[w.state] = others.get(w.state, 0) + 1
    return " ".join([f"{trained}/{len(run.workers)}", *(f"{n} {state}" for state, n in others.items())])


def _row(run) -> str:
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime(run.started_at)) if run.started_at else ""
    accuracy = f"{run.test_accuracy:.2%}" if run.round else "-"
    return (
        f"{run.run_id:<24} {STATE_NAMES[run.state]:<12} {run.round:>3}/{run.rounds:<4} {accuracy:>8}  "
        f"{_workers(run):<16} {started}  {run.error}"
    ).rstrip()


async def _watch(stub, run_id: str, from_start: bool, metadata) -> int:
    """The run's events to its end: on a terminal the live view `fedpi train` shows, else JSON lines."""
    from generated.fedpi.v1 import coordinator_pb2 as cpb

    view = None
    if sys.stdout.isatty():
        from coordinator_service.observe.progress import EventView

        run = await stub.GetRun(cpb.GetRunRequest(run_id=run_id), metadata=metadata)
        settings = json.loads(run.settings_json) if run.settings_json else {}
        view = EventView(batch_size=settings.get("training", {}).get("batch_size", 0), rounds=run.rounds or None)
    try:
        async for event in stub.WatchRun(cpb.WatchRunRequest(run_id=run_id, from_start=from_start), metadata=metadata):
            if view is None:
                print(event.json, flush=True)
            else:
                view.feed(json.loads(event.json))
    finally:
        if view is not None:
            view.close()
    run = await stub.GetRun(cpb.GetRunRequest(run_id=run_id), metadata=metadata)
    print(
        f"run {run.run_id} {STATE_NAMES[run.state]} after round {run.round} of {run.rounds}"
        + (f", test accuracy {run.test_accuracy:.2%}" if run.round else "")
        + (f": {run.error}" if run.error else ""),
        file=sys.stderr,
    )
    return 0 if run.state == cpb.RUN_STATE_FINISHED else 1


async def _model(stub, args, metadata) -> int:
    """Download, check the digest and the manifest as a worker would, save as a state_dict."""
    from fedpi.weights import serde
    from generated.fedpi.v1 import coordinator_pb2 as cpb

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
    print(
        f"{args.output}: run {args.run_id} round {header.round}, model {header.model_architecture}, "
        f"{len(payload) / 1e6:.1f} MB, {header.digest}"
    )
    return 0


async def run(args: argparse.Namespace) -> int:
    from fedpi.net.protocol import AUTH_METADATA_KEY
    from fedpi.runtime import read_secret
    from generated.fedpi.v1 import coordinator_pb2 as cpb
    from generated.fedpi.v1 import coordinator_pb2_grpc as cpb_grpc

    metadata = (
        ((AUTH_METADATA_KEY, f"Bearer {read_secret(args.token_file, '--token-file')}"),) if args.token_file else ()
    )
    async with _channel(args) as channel:
        stub = cpb_grpc.CoordinatorStub(channel)
        t = args.timeout
        if args.runs_command == "list":
            return await _list(stub, args.output, metadata, t)
        if args.runs_command == "get":
            run = await stub.GetRun(cpb.GetRunRequest(run_id=args.run_id), metadata=metadata, timeout=t)
            _print(as_dict(run), "yaml" if args.output == "table" else args.output)
            return 0
        if args.runs_command == "watch":
            return await _watch(stub, args.run_id, args.from_start, metadata)
        if args.runs_command == "stop":
            run = await stub.StopRun(
                cpb.StopRunRequest(run_id=args.run_id, abandon_round=args.abandon_round), metadata=metadata, timeout=t
            )
            print(f"run {run.run_id}: stopping " + ("now" if args.abandon_round else f"after round {run.round + 1}"))
            return 0
        if args.runs_command == "model":
            return await _model(stub, args, metadata)
        if args.runs_command == "start":
            run = await stub.StartRun(_spec(args), metadata=metadata, timeout=t)
        else:
            run = await stub.ResumeRun(cpb.ResumeRunRequest(run_id=args.run_id), metadata=metadata, timeout=t)
        print(run.run_id, flush=True)
        return await _watch(stub, run.run_id, True, metadata) if args.watch else 0


async def _list(stub, output: str, metadata, timeout: float) -> int:
    """Every run, page by page; a table, or one JSON / YAML list."""
    from generated.fedpi.v1 import coordinator_pb2 as cpb

    rows, token, warning = [], "", ""
    while True:
        runs = await stub.ListRuns(cpb.ListRunsRequest(page_token=token), metadata=metadata, timeout=timeout)
        if output == "table" and not token:
            print(HEADER)
        warning = warning or runs.warning
        for r in runs.runs:
            if output == "table":
                print(_row(r))
            else:
                rows.append(as_dict(r, summary=True))
        token = runs.next_page_token
        if not token:
            break
    if output != "table":
        _print(rows, output)
    if warning:
        print(f"warning: the coordinator says: {warning}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(parse_args(sys.argv[1:] if argv is None else argv))


def run_command(args: argparse.Namespace) -> int:
    import grpc

    try:
        return asyncio.run(run(args))
    except BrokenPipeError:  # `fedpi runs list | head`
        from fedpi.cli import broken_pipe

        return broken_pipe()
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            print(
                f"fedpi runs {args.runs_command}: cannot reach a coordinator at {args.coordinator}: is `fedpi serve` "
                f"running there? (--coordinator HOST:PORT or FEDPI_COORDINATOR; {exc.details()})",
                file=sys.stderr,
            )
        else:
            print(f"fedpi runs {args.runs_command}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"fedpi runs {args.runs_command}: {exc}", file=sys.stderr)
        return 2
