"""Buffered asynchronous versions (FedBuff) against fake workers the test releases one by one, so that every update's
staleness is set: the global model after each version is compared with the formula computed whole, to float
tolerance."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from coordinator_service import settings as run_settings
from coordinator_service.engine.buffered import MAX_WAITING_VERSIONS, STALE, AsyncSettings, BufferedRunner
from tests.coordinator_service.test_rounds import FakeWorker, _runner, tiny_model


class Gated(FakeWorker):
    """Trains only when the test lets it (`go`); counts its trainings and its uploads."""

    def __init__(self, name: str, seed: int, samples: int):
        super().__init__(name, seed, samples)
        self.go = asyncio.Semaphore(0)
        self.waiting = False
        self.uploads = 0

    async def train(self, request, on_progress=None):
        self.waiting = True
        await self.go.acquire()
        self.waiting = False
        return await super().train(request)

    async def get_weights(self, *args, **kwargs):
        self.uploads += 1
        async for chunk in super().get_weights(*args, **kwargs):
            yield chunk


class Roster:
    """What BufferedRunner reads of a roster: every worker present from the start."""

    def __init__(self, workers):
        self.active, self.away, self.expected, self.handshake_timeout = list(workers), [], None, 1.0

    def index(self, client) -> int:
        return self.active.index(client)

    async def admit(self):
        return []


async def until(condition, timeout: float = 10.0) -> None:
    async def poll():
        while not condition():
            await asyncio.sleep(0.001)

    await asyncio.wait_for(poll(), timeout)


def _flat_floats(state):
    return {k: v.double() for k, v in state.items() if v.is_floating_point()}


def _plus(state, updates, exponent=0.5):
    """x + sum(s_i w_i step_i) / sum(w_i) over (worker, w_i, staleness_i), for the float tensors; computed whole."""
    total = sum(w for _, w, _ in updates)
    out = {}
    for k, v in state.items():
        step = sum(w * (1 + tau) ** -exponent * worker.step()[k].double() for worker, w, tau in updates)
        out[k] = v + step / total
    return out


def _buffered(model, workers, stop=None, on_each=None, **settings):
    runner = _runner(model)
    made: list = []

    async def on_version(report, frozen):
        made.append((report, copy.deepcopy(frozen.state_dict())))
        if on_each is not None:
            await on_each()

    buffered = BufferedRunner(
        runner,
        Roster(workers),
        AsyncSettings(**settings),
        on_version,
        stall_timeout=30,
        retry_backoff=0.01,
        stop=stop,
    )
    return buffered, made


def test_each_version_is_the_staleness_weighted_mean_step_of_its_buffer():
    """K = 2, three workers. a and b report from v0 (staleness 0): v1; b, whose update made it, gets v1 at once. c,
    which trained from v0, then reports (staleness 1, weight 1/sqrt 2), and b from v1 (staleness 0): v2."""
    model = tiny_model()
    a, b, c = Gated("a", 1, 16), Gated("b", 2, 120), Gated("c", 3, 64)
    buffered, made = _buffered(model, [a, b, c], buffer_size=2, max_staleness=5)
    v0 = _flat_floats(model.state_dict())

    async def scenario():
        run = asyncio.create_task(buffered.run(0, 2))
        await until(lambda: a.waiting and b.waiting and c.waiting)
        a.go.release()
        await until(lambda: a.uploads == 1 and a.waiting)
        b.go.release()
        await until(lambda: buffered.version == 1 and b.waiting and a.waiting)
        c.go.release()
        await until(lambda: c.uploads == 1)
        b.go.release()
        return await run

    assert asyncio.run(scenario()) == 2
    v1 = _plus(v0, [(a, 16, 0), (b, 120, 0)])
    v2 = _plus(v1, [(c, 64, 1), (b, 120, 0)])
    for (_, state), want in zip(made, (v1, v2)):
        for k, v in _flat_floats(state).items():
            torch.testing.assert_close(v, want[k], rtol=1e-6, atol=1e-7)
    assert [r.round for r, _ in made] == [1, 2]
    assert {w.worker: w.staleness for w in made[1][0].workers} == {"c": 1, "b": 0}
    for k, v in _flat_floats(model.state_dict()).items():  # the live model is the last version
        torch.testing.assert_close(v, v2[k].float().double(), rtol=1e-6, atol=1e-7)


def test_an_update_older_than_max_staleness_is_refused_unfetched_and_its_worker_resynced():
    """max_staleness 0: c's update from v0 arrives after v1 was made; it is never fetched, c trains again from the
    newest version, and its second update counts."""
    model = tiny_model()
    a, b, c = Gated("a", 1, 16), Gated("b", 2, 120), Gated("c", 3, 64)
    buffered, made = _buffered(model, [a, b, c], buffer_size=2, max_staleness=0)
    v0 = _flat_floats(model.state_dict())

    async def scenario():
        run = asyncio.create_task(buffered.run(0, 2))
        await until(lambda: a.waiting and b.waiting and c.waiting)
        a.go.release()
        b.go.release()
        await until(lambda: buffered.version == 1 and a.waiting and b.waiting)
        c.go.release()  # trained from v0: one version old
        await until(lambda: c.waiting)  # refused, and sent v1
        assert c.uploads == 0
        c.go.release()
        await until(lambda: c.uploads == 1)
        b.go.release()
        return await run

    asyncio.run(scenario())
    stale = [f for f in made[1][0].failures if f.phase == STALE]
    assert [f.worker for f in stale] == ["c"] and "beyond --max-staleness 0" in stale[0].reason
    v1 = _plus(v0, [(a, 16, 0), (b, 120, 0)])
    v2 = _plus(v1, [(c, 64, 0), (b, 120, 0)])
    for k, v in _flat_floats(made[1][1]).items():
        torch.testing.assert_close(v, v2[k], rtol=1e-6, atol=1e-7)


def test_a_stop_asked_for_while_versions_keep_coming_ends_the_run_and_every_version_made_is_handed_on():
    """Workers that never wait make versions faster than they are handed on (evaluated, checkpointed): the stop,
    asked for while the first is handed on, still ends the run within the versions already waiting, and none of
    those is lost."""
    stop = asyncio.Event()

    async def slow_hand_on():
        stop.set()
        await asyncio.sleep(0.2)

    workers = [FakeWorker(n, i, 32) for i, n in enumerate("abc", start=1)]
    buffered, made = _buffered(tiny_model(), workers, stop=stop, on_each=slow_hand_on, buffer_size=1)
    last = asyncio.run(buffered.run(0, 200))
    assert 1 <= last <= 1 + MAX_WAITING_VERSIONS
    assert [r.round for r, _ in made] == list(range(1, last + 1))


def test_the_staleness_weight_follows_its_exponent():
    s = AsyncSettings(staleness_exponent=0.5)
    assert [s.staleness_weight(t) for t in (0, 3, 8)] == pytest.approx([1.0, 0.5, 1 / 3])
    assert AsyncSettings(staleness_exponent=0).staleness_weight(7) == 1.0


@pytest.mark.parametrize(
    "layer, named",
    [
        ({"aggregation": "median"}, "aggregation median"),
        ({"strategy": "fednova"}, "strategy fednova"),
        ({"fraction": 0.5}, "fraction"),
        ({"federated_evaluation": True}, "federated_evaluation"),
    ],
)
def test_async_refuses_what_needs_whole_rounds_and_says_so(layer, named):
    with pytest.raises(run_settings.SettingsError, match=f"mode async does not go with {named}"):
        run_settings.merge({"mode": "async", **layer})


def test_async_with_a_time_budget_weighs_by_samples_not_fednova():
    settings = run_settings.merge({"mode": "async", "local_seconds": 30})
    assert settings.strategy_name == "fedavg"
    assert run_settings.merge({"local_seconds": 30}).strategy_name == "fednova"
