"""Server optimisers against the update rules of Reddi et al. 2021 computed by hand, through real rounds with fake
workers; their state survives a checkpoint."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from coordinator_service.engine import checkpoint
from coordinator_service.policy.server_opt import ServerOptimizer, ServerOptimizerConfig, update_agreement
from tests.coordinator_service.test_rounds import FakeWorker, _runner, tiny_model


def _hand(name: str, x: torch.Tensor, deltas: list[torch.Tensor], c: ServerOptimizerConfig) -> torch.Tensor:
    """The global model after the given pseudo-gradients, by the paper's formulas, in float64."""
    m, v = torch.zeros_like(x), torch.full_like(x, c.tau**2)
    for d in deltas:
        if name == "fedavgm":
            m = c.beta1 * m + d
            x = x + c.lr * m
            continue
        m = c.beta1 * m + (1 - c.beta1) * d
        if name == "fedadagrad":
            v = v + d * d
        elif name == "fedyogi":
            v = v - (1 - c.beta2) * d * d * torch.sign(v - d * d)
        else:
            v = c.beta2 * v + (1 - c.beta2) * d * d
        x = x + c.lr * m / (v.sqrt() + c.tau)
    return x


@pytest.mark.parametrize("name, lr", [("fedavgm", 1.0), ("fedadam", 0.01), ("fedyogi", 0.01), ("fedadagrad", 0.01)])
def test_two_rounds_follow_the_update_rule(name, lr):
    # Prepare: every worker steps by the same fixed amount from whatever model it gets, so the mean update is known.
    config = ServerOptimizerConfig(name=name, lr=lr)
    model = tiny_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    runner = _runner(model, server_optimizer=ServerOptimizer(config))
    workers = [FakeWorker("a", 1, 64), FakeWorker("b", 2, 64)]
    step = {}
    for w in workers:
        w.state = start
        step[w.name] = w.step()
    mean_step = {k: (step["a"][k].double() + step["b"][k].double()) / 2 for k in start}
    # Execute
    for r in (1, 2):
        asyncio.run(runner.run_round(r, workers))
    # Assert: the fake's step does not depend on the model, so both rounds' pseudo-gradients are the mean step.
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            expected = _hand(name, start[k].double(), [mean_step[k], mean_step[k]], config)
            torch.testing.assert_close(v.double(), expected, rtol=1e-4, atol=1e-6)


def test_fedavg_keeps_no_state_and_changes_nothing():
    opt = ServerOptimizer()
    agg = [torch.ones(3)]
    opt.step([torch.zeros(3)], agg)
    assert torch.equal(agg[0], torch.ones(3)) and opt.state_dict()["m"] == []


def test_the_state_survives_a_checkpoint_and_resumes_the_same_trajectory(tmp_path):
    config = ServerOptimizerConfig(name="fedadam", lr=0.01)
    straight, resumed = ServerOptimizer(config), ServerOptimizer(config)
    g = [torch.zeros(4)]
    deltas = [torch.tensor([0.1, -0.2, 0.3, 0.0]), torch.tensor([0.2, 0.1, -0.1, 0.05])]
    a = [g[0] + deltas[0]]
    straight.step(g, a)
    resumed.step(g, [g[0] + deltas[0]])
    checkpoint.save(
        tmp_path,
        checkpoint.Checkpoint(
            round=1,
            model="m",
            state_dict={"w": a[0]},
            metrics=[],
            rng=checkpoint.Checkpoint.capture_rng(),
            server_optimizer=resumed.state_dict(),
        ),
    )
    reloaded = ServerOptimizer(config)
    reloaded.load_state_dict(checkpoint.load(tmp_path, "m").server_optimizer)
    x1, y1 = [a[0] + deltas[1]], [a[0] + deltas[1]]
    straight.step([a[0]], x1)
    reloaded.step([a[0]], y1)
    assert torch.equal(x1[0], y1[0])
    with pytest.raises(ValueError, match="--server-optimizer fedadam"):
        ServerOptimizer(ServerOptimizerConfig(name="fedyogi")).load_state_dict(reloaded.state_dict())


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown server optimizer"):
        ServerOptimizer(ServerOptimizerConfig(name="sgd"))
    with pytest.raises(ValueError, match="positive"):
        ServerOptimizer(ServerOptimizerConfig(name="fedadam", lr=-math.inf))


def test_feddyn_corrects_the_mean_by_h_on_the_parameters_and_leaves_buffers_the_mean():
    """The same mean step d every round: h1 = -alpha d, x1 = a1 - h1 / alpha = x0 + 2d; h2 = -2 alpha d,
    x2 = x1 + d + 2d = x0 + 5d. BatchNorm's running statistics are no parameters: they take the mean, x0 + 2d."""
    model = tiny_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    parameters = {name for name, _ in model.named_parameters()}
    runner = _runner(model, server_optimizer=ServerOptimizer(ServerOptimizerConfig(name="feddyn", alpha=0.3)))
    workers = [FakeWorker("a", 1, 64), FakeWorker("b", 2, 64)]
    for w in workers:
        w.state = start
    mean_step = {k: (workers[0].step()[k].double() + workers[1].step()[k].double()) / 2 for k in start}
    for r in (1, 2):
        asyncio.run(runner.run_round(r, workers))
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            times = 5 if k in parameters else 2
            torch.testing.assert_close(v.double(), start[k].double() + times * mean_step[k], rtol=1e-4, atol=1e-6)
    assert {"running_mean", "running_var"} & {k.split(".")[-1] for k in start}  # buffers were there to leave alone


def test_feddyn_s_correction_anneals_with_the_workers_learning_rate():
    """Cosine over 3 rounds gives the workers 1, 0.75 and 0.25 of their rate; the correction -h / alpha follows it.
    The same mean step d every round: h_r = -r alpha d, x_r = x_(r-1) + d + s_r r d, so x3 = x0 + (3 + 1 + 1.5 +
    0.75) d on the parameters (a correction at full strength would give 9 d), and x0 + 3 d on the buffers."""
    model = tiny_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    parameters = {name for name, _ in model.named_parameters()}
    runner = _runner(model, server_optimizer=ServerOptimizer(ServerOptimizerConfig(name="feddyn", alpha=0.3)))
    runner.strategy.lr_schedule, runner.strategy.rounds = "cosine", 3
    workers = [FakeWorker("a", 1, 64), FakeWorker("b", 2, 64)]
    for w in workers:
        w.state = start
    mean_step = {k: (workers[0].step()[k].double() + workers[1].step()[k].double()) / 2 for k in start}
    for r in (1, 2, 3):
        asyncio.run(runner.run_round(r, workers))
    assert [runner.strategy.lr_factor(r) for r in (1, 2, 3)] == pytest.approx([1, 0.75, 0.25])
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            times = 6.25 if k in parameters else 3
            torch.testing.assert_close(v.double(), start[k].double() + times * mean_step[k], rtol=1e-4, atol=1e-6)


def test_feddyn_reaches_every_worker_s_request_and_refuses_what_it_cannot_go_with():
    from coordinator_service import settings as run_settings
    from coordinator_service.control import launch

    s = run_settings.merge({"server_optimizer": "feddyn", "feddyn_alpha": 0.2})
    assert launch.strategy(s, 3).configure_train(1, 0).feddyn_alpha == 0.2
    assert launch.server_optimizer(s).alpha == 0.2
    assert launch.strategy(run_settings.merge({}), 3).configure_train(1, 0).feddyn_alpha == 0.0
    for layer, named in (
        ({"mode": "async"}, "mode async"),
        ({"local_seconds": 5}, "strategy fednova"),
        ({"proximal_mu": 0.1}, "proximal_mu"),
        ({"dp_sgd_noise_multiplier": 1.0}, "dp_sgd_noise_multiplier"),
    ):
        with pytest.raises(run_settings.SettingsError, match=f"server_optimizer feddyn does not go with {named}"):
            run_settings.merge({"server_optimizer": "feddyn", **layer})


def test_update_agreement_is_the_weighted_mean_of_the_pairwise_cosines():
    """From the mean's norm and each update's norm, against every pair's cosine computed whole."""
    gen = torch.Generator().manual_seed(3)
    shared = torch.randn(500, generator=gen, dtype=torch.float64)
    for spread in (0.1, 1.0, 10.0):
        updates = [shared + spread * torch.randn(500, generator=gen, dtype=torch.float64) for _ in range(4)]
        weights = [3.0, 1.0, 2.0, 5.0]
        w = [x / sum(weights) for x in weights]
        norms = [float(u.norm()) for u in updates]
        pairs = [(i, j) for i in range(4) for j in range(4) if i != j]
        whole = sum(
            w[i] * w[j] * norms[i] * norms[j] * float(torch.nn.functional.cosine_similarity(updates[i], updates[j], 0))
            for i, j in pairs
        ) / sum(w[i] * w[j] * norms[i] * norms[j] for i, j in pairs)
        mean = float(sum(wi * u for wi, u in zip(w, updates)).norm())
        assert update_agreement(norms, weights, mean) == pytest.approx(whole, rel=1e-9)
    assert update_agreement([1.0, 1.0], [1.0, 1.0], 1.0) == pytest.approx(1.0)  # the same update twice
    assert update_agreement([1.0, 1.0], [1.0, 1.0], math.sqrt(0.5)) == pytest.approx(0.0)  # at right angles
    assert update_agreement([1.0], [1.0], 1.0) is None
    assert update_agreement([1.0, 0.0], [1.0, 1.0], 0.5) is None  # one update did not move


class Agreeing(FakeWorker):
    """A step shared by every worker, plus a tenth of its own."""

    def step(self):
        own, shared = super().step(), FakeWorker("shared", 99).step_on(self.state)
        return {k: shared[k] + 0.1 * own[k] if v.is_floating_point() else own[k] for k, v in self.state.items()}


def _fleet(cls, n=3):
    workers = [cls(name, seed) for seed, name in enumerate("abcdefgh"[:n], start=1)]
    for w in workers:
        w.info.protocol_version = "1.13"
    return workers


def _mean_step(workers, state):
    for w in workers:
        w.state = state
    steps = [w.step() for w in workers]
    return {k: sum(s[k].double() for s in steps) / len(steps) for k in state}


@pytest.mark.parametrize("cls, chosen", [(FakeWorker, "feddyn"), (Agreeing, "fedavg")])
def test_auto_chooses_feddyn_after_a_round_of_diverging_updates_and_fedavg_after_agreeing_ones(cls, chosen):
    """Round 1 is FedAvg and measures the agreement: independent random steps give about 0 (the tiny model has few
    weights, so not quite 0); a shared step with a tenth of noise about 0.99. Round 2 then runs the choice on both
    sides. With FedDyn, every worker is asked for its regulariser and the parameters move by twice the mean step
    (h = -alpha d from 0); with FedAvg, by the mean step."""
    model = tiny_model()
    parameters = {name for name, _ in model.named_parameters()}
    runner = _runner(model, server_optimizer=ServerOptimizer(ServerOptimizerConfig(name="auto", alpha=0.1)))
    workers = _fleet(cls)
    x0 = {k: v.clone() for k, v in model.state_dict().items()}
    step1 = _mean_step(workers, x0)
    first = asyncio.run(runner.run_round(1, workers))
    assert first.server_optimizer == "fedavg" and workers[0].last_request.feddyn_alpha == 0
    assert (first.update_agreement < 0.3) if chosen == "feddyn" else (first.update_agreement > 0.95)
    x1 = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in x1.items():
        if v.is_floating_point():
            torch.testing.assert_close(v.double(), x0[k].double() + step1[k], rtol=1e-4, atol=1e-6)
    step2 = _mean_step(workers, x1)
    second = asyncio.run(runner.run_round(2, workers))
    assert second.server_optimizer == chosen
    assert all(w.last_request.feddyn_alpha == (0.1 if chosen == "feddyn" else 0) for w in workers)
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            times = 2 if chosen == "feddyn" and k in parameters else 1
            torch.testing.assert_close(v.double(), x1[k].double() + times * step2[k], rtol=1e-4, atol=1e-6)
    assert runner.server_optimizer.agreement == pytest.approx(first.update_agreement)


def test_auto_measures_the_agreement_of_the_updates_it_averaged():
    """The event's agreement equals the pairwise cosines of the workers' steps computed whole (equal weights)."""
    model = tiny_model()
    runner = _runner(model, server_optimizer=ServerOptimizer(ServerOptimizerConfig(name="auto")))
    workers = _fleet(FakeWorker)
    for w in workers:
        w.state = model.state_dict()
    steps = [torch.cat([v.double().flatten() for v in w.step().values() if v.is_floating_point()]) for w in workers]
    norms = [s.norm() for s in steps]
    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
    whole = sum(float(steps[i] @ steps[j]) for i, j in pairs) / sum(float(norms[i] * norms[j]) for i, j in pairs)
    report = asyncio.run(runner.run_round(1, workers))
    assert report.update_agreement == pytest.approx(whole, abs=1e-5)


def test_auto_stays_with_fedavg_when_a_worker_cannot_run_feddyn_and_keeps_its_choice_across_a_resume():
    model = tiny_model()
    runner = _runner(model, server_optimizer=ServerOptimizer(ServerOptimizerConfig(name="auto")))
    workers = _fleet(FakeWorker)
    workers[1].info.protocol_version = "1.12"
    asyncio.run(runner.run_round(1, workers))
    assert runner.server_optimizer.chosen and runner.server_optimizer.active == "fedavg"
    assert runner.server_optimizer.agreement < 0.3  # it disagreed, yet FedDyn would have refused bob
    asyncio.run(runner.run_round(2, workers))
    assert workers[0].last_request.feddyn_alpha == 0

    diverged = ServerOptimizer(ServerOptimizerConfig(name="auto"))
    diverged.choose(0.2)
    resumed = ServerOptimizer(ServerOptimizerConfig(name="auto"))
    resumed.load_state_dict(diverged.state_dict())
    assert (resumed.active, resumed.agreement, resumed.worker_alpha) == ("feddyn", 0.2, 0.1)
    assert not resumed.choose(0.9)  # chosen once for the whole run
    assert resumed.active == "feddyn"


def test_auto_is_the_default_and_is_fedavg_where_it_cannot_measure_or_feddyn_cannot_run():
    from coordinator_service import settings as run_settings
    from coordinator_service.control import launch

    assert launch.server_optimizer(run_settings.merge({})).name == "auto"
    for layer in (
        {"mode": "async"},
        {"local_seconds": 5},
        {"proximal_mu": 0.1},
        {"dp_sgd_noise_multiplier": 1.0},
        {"aggregation": "median"},
        {"dp_noise_multiplier": 1.0, "dp_clip_norm": 1.0},
        {"secure_aggregation": True},
    ):
        assert launch.server_optimizer(run_settings.merge(layer)).name == "fedavg", layer
