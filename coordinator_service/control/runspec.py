"""A RunSpec (the control API's request) read as data: what to train and where (a RunTarget), and the request's
layer of run settings. Nothing here parses a command line, opens a file, imports a module or connects anywhere; the
server's policy (which tasks and workers it allows) decides the rest before anything is created.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from coordinator_service import settings as run_settings
from generated.fedpi.v1 import coordinator_pb2 as cpb

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
WORKER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
TASK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}(:[A-Za-z_][A-Za-z0-9_]{0,99})?")
OPTION_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
HOST_NAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)
MAX_SETTINGS = 64
MAX_VALUE_CHARS = 256
# The typed groups of RunSpec, each a message whose fields are run settings of the same names.
TYPED_GROUPS = ("training", "sampling", "aggregation", "server", "evaluation", "transfer", "timeouts", "privacy")


class InvalidSpec(ValueError):
    """A RunSpec that cannot be a run; the message names the field, the value and what is allowed."""


class NotAllowed(Exception):
    """A RunSpec asking for something the server does not allow (a task, a worker host)."""


@dataclass(frozen=True)
class Address:
    host: str  # a DNS name, or an IP address without brackets
    port: int

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, what: str) -> Address:
    """HOST:PORT, [IPv6]:PORT; a clear InvalidSpec otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidSpec(f"{what} = {_shown(text)}: use HOST:PORT with a port from 1 to 65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidSpec(f"{what} = {_shown(text)}: {_shown(host)} is not an IPv6 address") from None
    elif ":" in host or not (HOST_NAME.fullmatch(host) or _is_ip(host)):
        raise InvalidSpec(
            f"{what} = {_shown(text)}: {_shown(host)} is not a host name or IP address "
            f"(IPv6 goes in brackets: [::1]:50051)"
        )
    return Address(host.rstrip(".").lower() if not _is_ip(host) else host, int(port))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class RunTarget:
    """What a run trains and on which workers: the task (and the built-in task's model and dataset), and either named
    worker addresses or a DNS name that resolves to every worker."""

    task: str = ""
    model: str = ""
    dataset: str = ""
    workers: tuple[tuple[str, Address], ...] = ()
    workers_dns: Address | None = None
    expect_workers: int = 0

    def with_defaults(self, defaults: RunTarget) -> RunTarget:
        """The server's defaults where this target says nothing (its workers only if it names none)."""
        names_workers = bool(self.workers or self.workers_dns)
        return RunTarget(
            task=self.task or defaults.task,
            model=self.model or defaults.model,
            dataset=self.dataset or defaults.dataset,
            workers=self.workers if names_workers else defaults.workers,
            workers_dns=self.workers_dns if names_workers else defaults.workers_dns,
            expect_workers=self.expect_workers or (0 if names_workers else defaults.expect_workers),
        )

    def checked(self, max_workers: int) -> RunTarget:
        """Complete and within bounds, or InvalidSpec."""
        if bool(self.workers) == bool(self.workers_dns):
            raise InvalidSpec(
                "the run names no workers: set workers (NAME=HOST:PORT, ...) or workers_dns with expect_workers"
                if not self.workers
                else "workers and workers_dns exclude each other"
            )
        if len(self.workers) > max_workers or self.expect_workers > max_workers:
            raise InvalidSpec(
                f"the run names {max(len(self.workers), self.expect_workers)} workers; this coordinator "
                f"allows at most {max_workers} per run"
            )
        if self.workers_dns and self.expect_workers < 1:
            raise InvalidSpec("workers_dns needs expect_workers >= 1: how many workers to wait for")
        if not self.task:
            raise InvalidSpec("the run names no task")
        return self

    @property
    def worker_count(self) -> int:
        return len(self.workers) or self.expect_workers

    def as_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "model": self.model,
            "dataset": self.dataset,
            "workers": [f"{name}={address}" for name, address in self.workers],
            "workers_dns": str(self.workers_dns) if self.workers_dns else "",
            "expect_workers": self.expect_workers,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunTarget:
        return cls(
            task=data["task"],
            model=data["model"],
            dataset=data["dataset"],
            workers=parse_workers(data["workers"]),
            workers_dns=parse_address(data["workers_dns"], "workers_dns") if data["workers_dns"] else None,
            expect_workers=data["expect_workers"],
        )


def parse_workers(items: list[str] | tuple[str, ...], what: str = "workers") -> tuple[tuple[str, Address], ...]:
    """['alice=10.0.0.2:50051', '10.0.0.3:50051', ...]: a bare address is named after itself."""
    workers = []
    for i, item in enumerate(items):
        if len(item) > 300:
            raise InvalidSpec(f"{what}[{i}] is {len(item)} characters long; NAME=HOST:PORT fits in 300")
        name, sep, address = item.strip().partition("=")
        if not sep:
            name, address = item.strip(), item.strip()
        elif not WORKER_NAME.fullmatch(name):
            raise InvalidSpec(f"{what}[{i}] = {_shown(item)}: a worker name is 1-63 letters, digits, '.', '_' or '-'")
        workers.append((name, parse_address(address, f"{what}[{i}]")))
    names = [n for n, _ in workers]
    if len(set(names)) != len(names):
        raise InvalidSpec(f"{what}: names must be unique, got {', '.join(sorted(names))}")
    return tuple(workers)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _text(value: str, what: str, pattern: re.Pattern, allowed: str) -> str:
    if value and not pattern.fullmatch(value):
        raise InvalidSpec(f"{what} = {_shown(value)}: {allowed}")
    return value


def run_id_of(spec: cpb.RunSpec) -> str:
    return _text(spec.run_id, "run_id", RUN_ID, "use 1-64 letters, digits, '.', '_' or '-' (not first)")


def target_of(spec: cpb.RunSpec) -> RunTarget:
    """The spec's task and workers, each field checked (sizes and patterns); nothing resolved or imported."""
    if len(spec.workers) > run_settings.MAX_WORKERS:
        raise InvalidSpec(f"workers lists {len(spec.workers)} entries; at most {run_settings.MAX_WORKERS}")
    if not 0 <= spec.expect_workers <= run_settings.MAX_WORKERS:
        raise InvalidSpec(f"expect_workers = {spec.expect_workers}: allowed 0 to {run_settings.MAX_WORKERS}")
    return RunTarget(
        task=_text(spec.task, "task", TASK_NAME, "a task name from `fedpi tasks`, or package.module:Class"),
        model=_text(spec.model, "model", OPTION_NAME, "a model name such as reference-cnn"),
        dataset=_text(spec.dataset, "dataset", OPTION_NAME, "a dataset name such as mnist"),
        workers=parse_workers(list(spec.workers)),
        workers_dns=parse_address(spec.workers_dns, "workers_dns") if spec.workers_dns else None,
        expect_workers=spec.expect_workers,
    )


def settings_layer(spec: cpb.RunSpec) -> dict[str, Any]:
    """The run settings the request sets: `rounds`, the typed groups and the `settings` map (the same names; one
    name set twice is refused). Values are checked when the layers are merged."""
    layer: dict[str, Any] = {}
    if spec.rounds:
        layer["rounds"] = spec.rounds
    for group in TYPED_GROUPS:
        for descriptor, value in getattr(spec, group).ListFields():
            layer[descriptor.name] = value
    if len(spec.settings) > MAX_SETTINGS:
        raise InvalidSpec(f"settings holds {len(spec.settings)} entries; at most {MAX_SETTINGS}")
    for key, text in sorted(spec.settings.items()):
        if len(key) > 64 or len(text) > MAX_VALUE_CHARS:
            raise InvalidSpec(f"settings[{_shown(key)}]: keys fit in 64 characters and values in {MAX_VALUE_CHARS}")
        try:
            name = run_settings.canonical(key)
        except run_settings.SettingsError:
            raise InvalidSpec(_not_a_setting(key)) from None
        if name in layer:
            raise InvalidSpec(f"settings[{key!r}] sets {name}, which the request already sets")
        layer[name] = run_settings.parse_value(name, text)
    return layer


# What the old settings map accepted that is not a run setting now, and where it went.
REPLACEMENTS = {
    "task": "the task field (fedpi runs start --task)",
    "model": "the model field (--model)",
    "dataset": "the dataset field (--dataset)",
    "workers": "the workers field (--workers)",
    "workers_dns": "the workers_dns field (--workers-dns)",
    "expect_workers": "the expect_workers field (--expect-workers)",
    "preset": "the preset field (--preset)",
}


def _not_a_setting(key: str) -> str:
    name = key.strip().lstrip("-").replace("-", "_")
    if name in REPLACEMENTS:
        return f"settings[{_shown(key)}]: set {REPLACEMENTS[name]} instead"
    return (
        f"settings[{_shown(key)}] is not a run setting (paths, credentials, outputs, data locations and "
        f"ports are the server's own); run settings are: {', '.join(sorted(run_settings.FIELDS))}"
    )


def preset_of(spec: cpb.RunSpec) -> str:
    if spec.preset and spec.preset not in run_settings.PRESETS:
        raise InvalidSpec(f"preset = {_shown(spec.preset)}: choose from {', '.join(run_settings.PRESETS)}")
    return spec.preset


@dataclass(frozen=True)
class WorkerPolicy:
    """Which hosts a run may reach: IP addresses and networks, and DNS names (exactly, e.g. the workers' headless
    Service). The server's own default workers are allowed by being the operator's choice."""

    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    names: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def parse(cls, entries: list[str]) -> WorkerPolicy:
        networks, names = [], set()
        for entry in filter(None, (e.strip() for e in entries)):
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            if not HOST_NAME.fullmatch(entry):
                raise ValueError(
                    f"--allow-workers {entry!r}: give an IP address, a CIDR network (10.0.0.0/24) or a DNS name"
                )
            names.add(entry.rstrip(".").lower())
        return cls(tuple(networks), frozenset(names))

    def allows(self, address: Address) -> bool:
        ip = address.ip
        if ip is not None:
            return any(ip.version == net.version and ip in net for net in self.networks)
        return address.host in self.names

    def check(self, target: RunTarget) -> None:
        hosts = [(f"workers[{i}]", a) for i, (_, a) in enumerate(target.workers)]
        if target.workers_dns:
            hosts.append(("workers_dns", target.workers_dns))
        for what, address in hosts:
            if not self.allows(address):
                raise NotAllowed(
                    f"{what} = {address}: this coordinator may not reach {address.host} (allowed: "
                    f"{self.describe()}; the operator widens this with `fedpi serve --allow-workers`)"
                )

    def describe(self) -> str:
        return ", ".join([*map(str, self.networks), *sorted(self.names)]) or "nothing"

    def including(self, target: RunTarget) -> WorkerPolicy:
        """This policy and the hosts of `target` (the server's own defaults)."""
        extra = WorkerPolicy.parse(
            [a.host for _, a in target.workers] + ([target.workers_dns.host] if target.workers_dns else [])
        )
        return WorkerPolicy(self.networks + extra.networks, self.names | extra.names)


LOOPBACK = WorkerPolicy.parse(["127.0.0.0/8", "::1", "localhost"])
