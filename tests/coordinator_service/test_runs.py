"""The control API's state and bounds without a server: runs on disk (torn events, unreadable records, pages,
retention) and the RunManager's checks of a spec, each against what it must refuse."""

from __future__ import annotations

import asyncio
import json

import pytest

from coordinator_service.control import launch, runspec
from coordinator_service.control.manager import RunManager, ServerRuns, TooMany
from coordinator_service.control.runs import RunRecord, RunStore
from coordinator_service.control.runspec import InvalidSpec, NotAllowed, RunTarget, WorkerPolicy
from coordinator_service.settings import SettingsError
from generated.fedpi.v1 import coordinator_pb2 as cpb


def test_a_torn_last_event_is_cut_off_and_the_next_event_starts_on_its_own_line(tmp_path):
    store = RunStore(tmp_path)
    run_log = store.create(RunRecord(run_id="r", spec={}))
    run_log.add_event({"event": "a"})
    run_log.add_event({"event": "b"})
    with run_log.events_path.open("a") as f:
        f.write('{"sequence": 3, "event": "c')  # what a power cut leaves
    reopened = RunStore(tmp_path).get("r")
    assert reopened.count == 2
    reopened.add_event({"event": "d"})
    events, _ = reopened.read_events(0)
    assert [(e["sequence"], e["event"]) for e in events] == [(1, "a"), (2, "b"), (3, "d")]


def test_events_are_read_from_disk_from_an_offset(tmp_path):
    run_log = RunStore(tmp_path).create(RunRecord(run_id="r", spec={}))
    run_log.add_event({"event": "a"})
    first, offset = run_log.read_events(0)
    assert offset == run_log.end_offset() and [e["event"] for e in first] == ["a"]
    run_log.add_event({"event": "b"})
    assert [e["event"] for e in run_log.read_events(offset)[0]] == ["b"]


@pytest.mark.parametrize(
    "content",
    [
        '{"run_id": "x", "spec": ',
        '{"run_id": "other", "spec": {}}',
        '{"run_id": "x", "spec": {}, "state": "weird"}',
        '{"unknown_field": 1}',
    ],
)
def test_an_unreadable_run_is_moved_aside_and_the_rest_load(tmp_path, content):
    store = RunStore(tmp_path)
    store.create(RunRecord(run_id="good", spec={}))
    (tmp_path / "runs" / "x").mkdir()
    (tmp_path / "runs" / "x" / "run.json").write_text(content)
    reopened = RunStore(tmp_path)
    assert list(reopened.logs) == ["good"] and reopened.unreadable == ["x"]
    assert (tmp_path / "unreadable" / "x" / "run.json").read_text() == content


def test_run_json_is_replaced_whole(tmp_path):
    run_log = RunStore(tmp_path).create(RunRecord(run_id="r", spec={}))
    run_log.record.round = 7
    run_log.save()
    assert json.loads((tmp_path / "runs" / "r" / "run.json").read_text())["round"] == 7
    assert not list((tmp_path / "runs" / "r").glob("*.tmp"))


def test_pages_and_retention(tmp_path):
    store = RunStore(tmp_path)
    for i in range(5):
        store.create(RunRecord(run_id=f"r{i}", spec={}, state="finished", started_at=float(i)))
    store.create(RunRecord(run_id="stopped", spec={}, state="stopped", started_at=-1.0))
    page, token = store.page(2)
    assert [r.record.run_id for r in page] == ["r4", "r3"] and token == "r3"
    assert [r.record.run_id for r in store.page(2, token)[0]] == ["r2", "r1"]
    with pytest.raises(ValueError, match="names no run"):
        store.page(2, "nope")
    assert store.retain(2) == ["r2", "r1", "r0"]
    assert sorted(store.logs) == ["r3", "r4", "stopped"] and not (tmp_path / "runs" / "r0").exists()


def _manager(tmp_path, **config) -> RunManager:
    defaults = dict(
        place=launch.RunPlace(output_dir=tmp_path), defaults=RunTarget(task="mnist"), allowed_tasks=frozenset({"mnist"})
    )
    return RunManager(RunStore(tmp_path), ServerRuns(**{**defaults, **config}))


def test_watch_streams_are_capped(tmp_path):
    manager = _manager(tmp_path, max_watchers=1)
    manager.store.create(RunRecord(run_id="r", spec={}, state="training"))

    async def scenario():
        first = manager.watch("r", from_start=True)
        waiting = asyncio.ensure_future(first.__anext__())  # holds the stream open: the run has no events yet
        await asyncio.sleep(0.05)
        with pytest.raises(TooMany):
            await asyncio.wait_for(manager.watch("r", from_start=True).__anext__(), timeout=5)
        waiting.cancel()  # the client goes away: its stream ends and frees its place
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert manager.watchers == 0

    asyncio.run(scenario())
    manager.close()


@pytest.mark.parametrize(
    "spec, error, phrase",
    [
        (cpb.RunSpec(workers=["a=10.0.0.1:1"]), NotAllowed, "may not reach 10.0.0.1"),
        (cpb.RunSpec(workers=["a=127.0.0.1:1"], task="os:system"), NotAllowed, "task 'os:system' is not allowed"),
        (cpb.RunSpec(workers=["a=127.0.0.1:1", "a=127.0.0.1:2"]), InvalidSpec, "names must be unique"),
        (cpb.RunSpec(workers=["a b=127.0.0.1:1"]), InvalidSpec, "a worker name is"),
        (cpb.RunSpec(workers=["a=127.0.0.1:1"], run_id="lab-1\n"), InvalidSpec, "run_id = 'lab-1\\\\n'"),
        (cpb.RunSpec(workers=["a=127.0.0.1:1"], task="mnist\n"), InvalidSpec, "task = "),
        (cpb.RunSpec(workers=["a=127.0.0.1:70000"]), InvalidSpec, "port from 1 to 65535"),
        (cpb.RunSpec(workers=["a=127.0.0.1:1"], workers_dns="127.0.0.1:2"), InvalidSpec, "exclude each other"),
        (cpb.RunSpec(workers_dns="127.0.0.1:2"), InvalidSpec, "needs expect_workers"),
        (cpb.RunSpec(workers=["a=127.0.0.1:1"], sampling=cpb.Sampling(min_workers=2)), ValueError, "can never be met"),
        (
            cpb.RunSpec(workers=["a=127.0.0.1:1"], settings={"lr": "0.1"}, training=cpb.LocalTraining(lr=0.2)),
            InvalidSpec,
            "which the request already sets",
        ),
        (
            cpb.RunSpec(workers=["a=127.0.0.1:1"], settings={"federated-evaluation": "maybe"}),
            SettingsError,
            "use true or false",
        ),
        (
            cpb.RunSpec(workers=["a=127.0.0.1:1"], aggregation=cpb.AggregationSettings(aggregation="trimmed-mean:2")),
            ValueError,
            "needs at least 5 workers",
        ),
        (
            cpb.RunSpec(
                workers=["a=127.0.0.1:1"], aggregation=cpb.AggregationSettings(mode="async", strategy="fednova")
            ),
            SettingsError,
            "mode async does not go with strategy fednova",
        ),
        (
            cpb.RunSpec(workers=["a=127.0.0.1:1"], aggregation=cpb.AggregationSettings(mode="later")),
            SettingsError,
            "mode = 'later'",
        ),
    ],
)
def test_a_spec_is_refused_whole_before_anything_is_created(tmp_path, spec, error, phrase):
    manager = _manager(tmp_path)
    with pytest.raises(error, match=phrase):
        manager.prepare(spec)
    assert not list((tmp_path / "runs").iterdir())
    manager.close()


def test_the_request_wins_over_the_server_whose_environment_wins_over_the_preset(tmp_path):
    manager = _manager(tmp_path, preset="seed", layer={"lr": "0.3", "federated_evaluation": "true"})
    _, _, settings = manager.prepare(cpb.RunSpec(workers=["a=127.0.0.1:1"]))
    assert (settings.training.lr, settings.training.momentum, settings.evaluation.federated_evaluation) == (
        0.3,
        0.0,
        True,
    )  # the environment's lr over the preset's, the preset's momentum over the default
    _, _, settings = manager.prepare(
        cpb.RunSpec(
            workers=["a=127.0.0.1:1"],
            training=cpb.LocalTraining(lr=0.02, lr_schedule="cosine"),
            evaluation=cpb.EvaluationSettings(federated_evaluation=False),
        )
    )
    assert (settings.training.lr, settings.evaluation.federated_evaluation) == (0.02, False)
    assert settings.training.effective_lr_schedule == "cosine"  # over the preset's constant
    manager.close()


def test_worker_policy_matches_addresses_networks_and_exact_names():
    policy = WorkerPolicy.parse(["10.0.0.0/24", "fedpi-worker", "::1"])
    ok = [runspec.parse_address(a, "w") for a in ("10.0.0.7:1", "fedpi-worker:50051", "FEDPI-WORKER.:1", "[::1]:5")]
    bad = [
        runspec.parse_address(a, "w")
        for a in ("10.0.1.7:1", "fedpi-worker.evil:1", "evil-fedpi-worker:1", "127.0.0.1:1", "localhost:1")
    ]
    assert all(policy.allows(a) for a in ok) and not any(policy.allows(a) for a in bad)
    with pytest.raises(ValueError, match="give an IP address"):
        WorkerPolicy.parse(["not a host"])


def test_a_run_spec_asks_for_asynchronous_versions_and_the_run_gets_them(tmp_path):
    from coordinator_service.control import launch
    from coordinator_service.control.launch import RunPlace

    manager = _manager(tmp_path)
    spec = cpb.RunSpec(
        workers=["a=127.0.0.1:1", "b=127.0.0.1:2", "c=127.0.0.1:3"],
        aggregation=cpb.AggregationSettings(mode="async", max_staleness=4, staleness_exponent=1.0),
    )
    _, _, settings = manager.prepare(spec)
    manager.close()
    workers = [("a", "127.0.0.1:1"), ("b", "127.0.0.1:2"), ("c", "127.0.0.1:3")]
    config = launch.run_config(settings, RunPlace(tmp_path), workers, task=None)  # type: ignore[arg-type]
    assert config.asynchronous == launch.AsyncSettings(buffer_size=2, max_staleness=4, staleness_exponent=1.0)
    assert launch.run_config(launch.RunSettings(), RunPlace(tmp_path), workers, task=None).asynchronous is None
