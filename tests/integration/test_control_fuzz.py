"""Random and nearly-valid RunSpecs thrown at a live `fedpi serve` (hypothesis). After every one: the service answers,
a refusal is INVALID_ARGUMENT or PERMISSION_DENIED (or ABORTED / ALREADY_EXISTS / RESOURCE_EXHAUSTED, which are not
about the spec) with a message and without internals; at the end: nothing was written outside the state dir and no
connection was made to a host outside the allow-list.

A few hundred examples run in `make test`; `make fuzz` runs 10,000 (FEDPI_FUZZ_EXAMPLES) and prints its figures.
"""

from __future__ import annotations

import os
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator_service import settings as run_settings
from coordinator_service.control.runspec import RUN_ID
from generated.fedpi.v1 import coordinator_pb2 as cpb
from tests.integration.test_control_plane import Listener, files
from tests.integration.test_service import Server, stub

EXAMPLES = int(os.environ.get("FEDPI_FUZZ_EXAMPLES", "300"))
ACCEPTABLE = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "outside").mkdir()
    (root / "outside" / "metrics.jsonl").write_text("another run's\n")
    listener = Listener("127.0.0.9")  # never allowed: nothing may connect here
    # Allowed workers point at a closed port, so a spec that passes every check starts a run that fails at once.
    srv = Server(
        root / "state",
        "--allow-workers",
        "127.0.0.1",
        "--discovery-timeout",
        "1",
        "--keep-runs",
        "5",
        env={"FEDPI_HANDSHAKE_TIMEOUT": "1", "FEDPI_ROUND_RETRIES": "0"},
    ).start()
    before = files(root / "outside")
    yield srv, listener, root, before
    srv.stop()
    listener.close()


def _hostile_text(max_size: int = 40):
    return st.one_of(
        st.text(max_size=max_size),
        st.sampled_from(
            [
                "../x",
                "a\n",
                "..",
                "/etc/passwd",
                "--output-dir=/tmp/evil",
                "x" * 300,
                "a b",
                "\x00",
                "tests.exiting_task:Task",
                "os:system",
                "mnist",
                "reference-cnn",
                "digits-5k",
                "",
            ]
        ),
    )


def _value(field, near: bool = False):
    f = field
    if f.type == f.TYPE_DOUBLE:
        if near:  # mostly in range
            return st.one_of(st.floats(0.01, 0.99), st.floats(1.0, 50.0), st.sampled_from([float("nan"), -1.0]))
        return st.floats(allow_nan=True, allow_infinity=True)
    if f.type in (f.TYPE_INT64, f.TYPE_INT32):
        if near:
            return st.one_of(st.integers(1, 5), st.integers(1024, 1 << 20), st.just(-1))
        return st.one_of(st.integers(-5, 200), st.integers(-(2**63), 2**63 - 1))
    if f.type == f.TYPE_BOOL:
        return st.booleans()
    choices = {
        "strategy": ["auto", "fedavg", "fednova"],
        "aggregation": ["fedavg", "median", "trimmed-mean:1", "clipped:2.5", "clipped:nan"],
        "server_optimizer": ["fedavg", "fedadam"],
        "compression": ["none", "zlib", "fp16", "int8"],
        "lr_schedule": ["auto", "cosine", "exponential", "constant"],
    }.get(f.name, [])
    if near:
        return st.sampled_from(choices or ["x"])
    return st.one_of(st.sampled_from(choices or ["x"]), st.text(max_size=20))


def _group(message_type, near: bool = False):
    fields = message_type.DESCRIPTOR.fields
    values = st.fixed_dictionaries({}, optional={f.name: _value(f, near) for f in fields})
    if near:  # most groups left unset, the others with one or two fields
        values = st.one_of(st.just({}), values.filter(lambda v: len(v) <= 2))
    return values.map(lambda v: message_type(**v))


KEYS = [
    *run_settings.FIELDS,
    *(k.replace("_", "-") for k in run_settings.FIELDS),
    "output",
    "output-dir",
    "token",
    "token-file",
    "tls-ca",
    "latest",
    "latest-link",
    "data-dir",
    "resume",
    "help",
    "--lr",
    "lr=0.1",
    "lr --output-dir",
    "task",
    "workers",
    "preset",
    "keep-round-models",
    "metrics-port",
]
VALUES = [
    "nan",
    "inf",
    "-inf",
    "-1",
    "0",
    "1e309",
    "true",
    "false",
    "0.1",
    "5",
    "--output-dir=/tmp/evil",
    "/etc/passwd",
    "fedavg",
    "median",
]


def near_valid_specs(listener: Listener):
    """Specs one or two mistakes (or none) away from a run: what gets past the first checks."""
    return st.builds(
        cpb.RunSpec,
        run_id=st.one_of(st.just(""), st.from_regex(RUN_ID, fullmatch=True), st.sampled_from(["a\n", "../x"])),
        task=st.sampled_from(["", "mnist", "breast-cancer", "tests.exiting_task:Task", "os:system", "nope"]),
        rounds=st.integers(0, 3),
        workers=st.lists(
            st.sampled_from(
                [
                    "a=127.0.0.1:1",
                    "b=127.0.0.1:2",
                    f"evil={listener.address}",
                    "c=10.0.0.1:50051",
                    "localhost:1",
                    "127.0.0.1:3",
                ]
            ),
            max_size=3,
            unique=True,
        ),
        settings=st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=2),
        training=_group(cpb.LocalTraining, near=True),
        sampling=_group(cpb.Sampling, near=True),
        aggregation=_group(cpb.AggregationSettings, near=True),
        transfer=_group(cpb.TransferSettings, near=True),
        timeouts=_group(cpb.Timeouts, near=True),
    )


def specs(listener: Listener):
    return st.one_of(random_specs(listener), near_valid_specs(listener))


def random_specs(listener: Listener):
    workers = st.one_of(
        st.sampled_from(
            [
                "a=127.0.0.1:1",
                "b=127.0.0.1:1",
                f"evil={listener.address}",
                "c=10.0.0.1:50051",
                "localhost:1",
                "d=[::1]:1",
                "e=evil.example:50051",
                "127.0.0.1:1",
                "f=127.0.0.1:0",
                "g=127.0.0.1:99999",
                "=127.0.0.1:1",
                "h=127.0.0.1",
            ]
        ),
        _hostile_text(),
    )
    return st.builds(
        cpb.RunSpec,
        run_id=st.one_of(st.from_regex(RUN_ID, fullmatch=True), _hostile_text(70)),
        task=_hostile_text(),
        model=_hostile_text(20),
        dataset=_hostile_text(20),
        rounds=st.one_of(st.integers(-3, 3), st.integers(-(2**63), 2**63 - 1)),
        workers=st.lists(workers, max_size=6),
        workers_dns=st.one_of(
            st.just(""), st.sampled_from(["127.0.0.1:1", listener.address, "fedpi-worker:50051"]), _hostile_text(30)
        ),
        expect_workers=st.one_of(st.integers(-2, 4), st.integers(-(2**63), 2**63 - 1)),
        settings=st.dictionaries(
            st.one_of(st.sampled_from(KEYS), st.text(max_size=20)),
            st.one_of(st.sampled_from(VALUES), st.text(max_size=30)),
            max_size=6,
        ),
        preset=st.sampled_from(["", "default", "seed", "fast", "../"]),
        training=_group(cpb.LocalTraining),
        sampling=_group(cpb.Sampling),
        aggregation=_group(cpb.AggregationSettings),
        server=_group(cpb.ServerOptimizerSettings),
        evaluation=_group(cpb.EvaluationSettings),
        transfer=_group(cpb.TransferSettings),
        timeouts=_group(cpb.Timeouts),
    )


def test_random_and_nearly_valid_specs_never_break_the_service(target):
    srv, listener, root, before = target
    api = stub(srv.address)
    tally = {"examples": 0, "started": 0, "failures": 0}
    codes: dict[str, int] = {}
    started = time.monotonic()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(spec=specs(listener))
    def check(spec: cpb.RunSpec) -> None:
        tally["examples"] += 1
        try:
            api.StartRun(spec, timeout=30)
            tally["started"] += 1
            codes["OK"] = codes.get("OK", 0) + 1
        except grpc.RpcError as err:
            codes[err.code().name] = codes.get(err.code().name, 0) + 1
            details = err.details() or ""
            ok = (
                err.code() in ACCEPTABLE
                and details
                and "Traceback" not in details
                and "usage:" not in details
                and str(root) not in details
                and len(details) < 4000
            )
            if not ok:
                tally["failures"] += 1
            assert ok, (err.code(), details[:500], spec)
        api.ListRuns(cpb.ListRunsRequest(page_size=5), timeout=10)  # the service answers

    check()
    seconds = time.monotonic() - started
    print(
        f"\nfuzz: {tally['examples']} RunSpecs in {seconds:.0f} s ({tally['examples'] / seconds:.0f}/s), "
        f"{tally['started']} started a run, {tally['failures']} failures; replies: "
        + ", ".join(f"{k} {v}" for k, v in sorted(codes.items()))
    )
    assert listener.accepted == 0
    assert files(root / "outside") == before
    assert {p.name for p in root.iterdir()} <= {"state", "outside", *(p.name for p in root.glob("serve-*.log"))}
    assert all(RUN_ID.fullmatch(p.name) for p in (root / "state" / "runs").iterdir())
    assert {p.name for p in (root / "state").iterdir()} <= {"runs"}
