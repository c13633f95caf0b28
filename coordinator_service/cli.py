"""The coordinator's command lines, `fedpi train|demo|tasks|serve`, built without importing torch or grpc, so
that `--help` and a mistyped flag answer at once.

  fedpi train --workers alice=10.0.0.11:50051,bob=10.0.0.12:50051 --rounds 10
  fedpi demo --rounds 5                # three local workers on 127.0.0.1, then the same training
  fedpi demo --task breast-cancer      # another task (`fedpi tasks` lists the installed ones)
  fedpi tasks
  fedpi serve --state-dir results      # a long-running coordinator: runs through its gRPC API
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Literal

from coordinator_service import settings as run_settings
from fedpi import names
from fedpi.cli import Parser, add_task_arguments, apply_env_defaults
from fedpi.logs import LOG_FORMATS


def worker_security_arguments(g) -> None:
    """How the coordinator proves itself to workers and checks them: `train`'s, `demo`'s and `serve`'s."""
    g.add_argument("--token-file", help="file holding the bearer token workers require")
    g.add_argument("--tls-ca", help="CA certificate to verify workers with; turns TLS on")
    g.add_argument("--tls-cert", help="client certificate, for workers that require mutual TLS")
    g.add_argument("--tls-key", help="private key of --tls-cert")
    g.add_argument("--tls-server-name", help="name on the workers' certificates when dialling them by IP address")


def config_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        metavar="FILE",
        help="a TOML file of options by their flags' names (lr = 0.1); FEDPI_* variables and flags "
        "override it [env FEDPI_CONFIG]",
    )


def _common(p: argparse.ArgumentParser) -> None:
    config_argument(p)
    p.add_argument(
        "--preset",
        choices=list(run_settings.PRESETS),
        default="default",
        help="a starting configuration that FEDPI_* variables and flags override: default (measured, "
        "docs/benchmarks.md, Learning) or seed (fedpi's first configuration: plain SGD, lr 0.01)",
    )
    # The coordinator evaluates on the task's held-out test set; workers load their own shards.
    add_task_arguments(p, default_dataset="auto")
    add_setting_flags(p)
    p.add_argument("--encoding", choices=("raw", "zlib"), help=argparse.SUPPRESS)  # before --compression
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from checkpoint.pt in --output-dir after the last completed round",
    )
    p.add_argument(
        "--output-dir",
        default="runs/latest",
        help="model.pt, metrics.jsonl and checkpoint.pt (after every round) go here",
    )
    p.add_argument("--latest-link", help="also point this symlink at --output-dir (e.g. results/latest)")
    p.add_argument(
        "--keep-round-models",
        type=int,
        default=0,
        help="also keep the global model of the last N rounds in --output-dir/rounds/",
    )
    worker_security_arguments(p.add_argument_group("security (see docs/threat-model.md)"))
    p.add_argument("--threads", type=int, default=0, help="torch threads for evaluation (0: torch's default)")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="serve Prometheus metrics at http://--metrics-host:PORT/metrics while training (0: off)",
    )
    p.add_argument("--metrics-host", default="127.0.0.1", help="address the metrics server listens on")
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="auto",
        help="json (the default when stdout is not a terminal) or console (with the live view on a terminal)",
    )


def build_parser(prog: str = "fedpi") -> Parser:
    p = Parser(prog=prog, description=__doc__)
    add_commands(p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser))
    return p


def add_commands(sub) -> None:
    """train, demo, tasks and serve, as subcommands of `sub` (the `fedpi` command's, or this module's own)."""
    train = sub.add_parser("train", help="train on running workers", description="Train on running workers.")
    train.add_argument("--workers", help="NAME=HOST:PORT,... (a bare HOST:PORT is named after itself)")
    train.add_argument(
        "--workers-dns",
        help="instead of --workers: HOST:PORT whose DNS name resolves to every worker (a Kubernetes headless Service)",
    )
    train.add_argument("--expect-workers", type=int, default=0, help="with --workers-dns: how many to wait for")
    train.add_argument(
        "--discovery-timeout",
        type=float,
        default=600.0,
        help="with --workers-dns: seconds to wait for --expect-workers to appear",
    )
    _common(train)
    demo = sub.add_parser(
        "demo",
        help="start local workers on 127.0.0.1 and train on them",
        description="Start local workers on 127.0.0.1 and train on them (what `make run` does).",
    )
    demo.add_argument("--local-workers", type=int, default=3, help="how many local workers to start")
    demo.add_argument("--worker-threads", type=int, default=1, help="torch threads per local worker")
    demo.add_argument(
        "--startup-timeout",
        type=float,
        default=120.0,
        help="seconds the local workers get to start serving (more on slow or emulated CPUs)",
    )
    demo.add_argument(
        "--partition-scheme",
        choices=names.PARTITION_SCHEMES,
        default="iid",
        help="how the data is cut among the local workers",
    )
    demo.add_argument(
        "--partition-alpha",
        type=float,
        default=names.DEFAULT_DIRICHLET_ALPHA,
        help="with --partition-scheme dirichlet: the concentration (0.1: few classes per worker)",
    )
    _common(demo)
    sub.add_parser(
        "tasks",
        help="list the installed tasks (the fedpi.tasks entry-point group)",
        description="List the installed tasks: name, version, where it comes from.",
    )
    config = sub.add_parser(
        "config",
        help="show the run settings in effect and where each comes from",
        description="Show the run settings in effect, and where each comes from: default, "
        "preset, config file, FEDPI_* variable or flag.",
    )
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="COMMAND", parser_class=Parser)
    show = config_sub.add_parser(
        "show",
        help="print every run setting, its value and its source",
        description="Print every run setting, its value and its source.",
    )
    config_argument(show)
    show.add_argument(
        "--preset", choices=list(run_settings.PRESETS), default="default", help="the starting configuration"
    )
    show.add_argument("-o", "--output", choices=("table", "json"), default="table", help="how to print them")
    add_setting_flags(show)
    add_serve_arguments(
        sub.add_parser(
            "serve",
            help="serve the coordinator's control API: start, watch, stop and resume runs, fetch their models",
            description="A long-running coordinator: operators start, watch, stop and resume runs through its gRPC "
            "API (fedpi runs), each run in its own directory under --state-dir.",
        )
    )
    # Run settings take their FEDPI_* variables through the settings model (run_settings.env_layer), the rest here.
    for parser in sub.choices.values():
        apply_env_defaults(parser, skip=set(run_settings.FIELDS))


def parse_args(argv: list[str] | None = None, prog: str = "fedpi") -> argparse.Namespace:
    """`prog`: how the user called this, for --help and errors."""
    return build_parser(prog).parse_args(sys.argv[1:] if argv is None else argv)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    config_argument(p)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the control API listens on; beyond loopback it needs --api-token-file with TLS, "
        "mutual TLS, or --insecure",
    )
    p.add_argument("--port", type=int, default=50050, help="port the control API listens on")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow what is unsafe beyond loopback: no authentication, a token in plaintext (shown in "
        "the log and in every ListRuns)",
    )
    p.add_argument(
        "--state-dir",
        default="coordinator-state",
        help="every run's record, events, metrics, checkpoints and models go under STATE_DIR/runs/",
    )
    p.add_argument(
        "--keep-round-models",
        type=int,
        default=5,
        help="keep the global model of each run's last N rounds (GetModel with a round)",
    )
    p.add_argument(
        "--keep-runs",
        type=int,
        default=100,
        help="keep the newest N finished runs and delete older ones (0: keep every run)",
    )
    p.add_argument("--latest-link", help="point this symlink at each run's directory when it starts")
    g = p.add_argument_group(
        "defaults of every run (a RunSpec's fields win; run settings come from FEDPI_* variables, e.g. FEDPI_LR)"
    )
    add_task_arguments(g, default_dataset="auto")
    g.add_argument(
        "--preset",
        choices=list(run_settings.PRESETS),
        default="default",
        help="the run settings' starting configuration",
    )
    g.add_argument("--workers", help="NAME=HOST:PORT,... for runs that name none")
    g.add_argument("--workers-dns", help="HOST:PORT resolving to every worker, for runs that name none")
    g.add_argument("--expect-workers", type=int, default=0, help="with --workers-dns: how many to wait for")
    g.add_argument(
        "--discovery-timeout",
        type=float,
        default=600.0,
        help="with workers_dns: seconds a run waits for its workers to appear",
    )
    g = p.add_argument_group("what runs may use")
    g.add_argument(
        "--allow-task",
        default="",
        help="tasks a RunSpec may name besides the installed ones (fedpi tasks) and --task: "
        "NAME or package.module:Class, comma-separated",
    )
    g.add_argument(
        "--allow-workers",
        default="",
        help="hosts runs may reach besides --workers / --workers-dns: IP addresses, CIDR networks and DNS "
        "names, comma-separated (e.g. 10.0.0.0/24,fedpi-worker; default: loopback only)",
    )
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
        p.add_argument_group("how runs reach the workers (the same flags as `train`; never part of a RunSpec)")
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads for evaluation (0: torch's default)")
    p.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics of the runs (0: off)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address the metrics server listens on")
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="auto",
        help="json (the default when stdout is not a terminal) or console (with the live view on a terminal)",
    )


def settings_of(args: argparse.Namespace) -> run_settings.RunSettings:
    """defaults < --preset < --config < FEDPI_* < flags, checked as a whole."""
    return run_settings.merge(*(layer for _, layer in layers_of(args)))


def layers_of(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """The run settings' sources, lowest first, each named as `fedpi config show` names it."""
    flags = flag_layer(args)
    if getattr(args, "encoding", None):
        flags.setdefault("compression", {"raw": "none", "zlib": "zlib"}[args.encoding])
    return [
        (f"preset {args.preset}", run_settings.preset_layer(args.preset)),
        (f"config {args.config}", getattr(args, "config_layer", {})),
        ("env", run_settings.env_layer()),
        ("flag", flags),
    ]


def read_config(args: argparse.Namespace) -> None:
    """--config: sets the options neither a flag nor the environment set, and keeps its run settings as a layer."""
    from fedpi import config

    args.config_layer = {}
    if getattr(args, "config", None) and args.command == "config":  # it shows run settings; the rest is not its
        args.config_layer = {k: v for k, v in config.load(args.config).items() if k in run_settings.FIELDS}
    elif getattr(args, "config", None):
        args.config_layer = config.apply(args.config, args.command_parser, args, args.argv, set(run_settings.FIELDS))


def _source(layer: str, field: str) -> str:
    if layer == "env":
        return f"env FEDPI_{field.upper()}"
    return f"flag --{field.replace('_', '-')}" if layer == "flag" else layer


def show_config(args: argparse.Namespace) -> int:
    """`fedpi config show`: every run setting, its value and where it comes from."""
    import json

    layers = layers_of(args)
    settings = run_settings.merge(*(layer for _, layer in layers))
    sources: dict[str, str] = {}
    for name, layer in layers:  # overlaid as merge() does, so a replaced local budget loses its source too
        fields = (run_settings.canonical(key) for key in layer)
        sources = run_settings.overlay(sources, {field: _source(name, field) for field in fields})
    rows = [(k, v, sources.get(k, "default")) for k, v in settings.flat().items()]
    if args.output == "json":
        print(json.dumps({k: {"value": v, "source": s} for k, v, s in rows}, indent=2))
    else:
        print(f"{'SETTING':<24} {'VALUE':<14} SOURCE")
        for k, v, s in rows:
            print(f"{k:<24} {'' if v is None else str(v):<14} {s}")
    return 0


# -- the run settings as flags --------------------------------------------------------------------------------------

GROUP_TITLES = {
    None: "run",
    "training": "local training (sent to every worker each round)",
    "sampling": "sampling and quorum",
    "aggregation": "aggregation",
    "server": "server optimizer",
    "evaluation": "evaluation",
    "transfer": "transfer",
    "timeouts": "timeouts and retries",
    "privacy": "differential privacy (worker-level, and DP-SGD on every worker)",
}


def add_setting_flags(parser) -> None:
    """One flag per setting (`--local-batches`, `--federated-evaluation/--no-federated-evaluation`), in groups, with
    the field's own description and default. A flag left out is no layer at all (argparse.SUPPRESS), so the
    environment and the preset keep their say; values are checked by merge(), like every other layer's."""
    import argparse

    groups: dict[str | None, Any] = {None: parser.add_argument_group(GROUP_TITLES[None])}
    for name, group in run_settings.FIELDS.items():
        if group not in groups:
            groups[group] = parser.add_argument_group(GROUP_TITLES[group])
        info = run_settings.field_info(name)
        flag = "--" + name.replace("_", "-")
        shown = "off" if info.default in (False, 0, None) and info.annotation is not int else info.default
        said = "" if "default" in (info.description or "") else f" (default: {shown})"
        help_text = f"{info.description}{said} [env FEDPI_{name.upper()}]"
        options: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
        if info.annotation is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif choices := getattr(info.annotation, "__args__", None) if _is_literal(info.annotation) else None:
            options["choices"] = choices
        else:
            options["metavar"] = (
                "SECONDS"
                if "seconds" in (info.description or "") and info.annotation is not int
                else ("N" if info.annotation is int else "X")
            )
        groups[group].add_argument(flag, **options)


def _is_literal(annotation: Any) -> bool:
    return getattr(annotation, "__origin__", None) is Literal


def flag_layer(args) -> dict[str, Any]:
    """The settings given as flags on this command line (argparse.Namespace)."""
    return {name: getattr(args, name) for name in run_settings.FIELDS if hasattr(args, name)}
