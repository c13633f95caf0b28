"""Server optimisers against the update rules of Reddi et al. 2021 computed by hand, through real rounds with fake
workers; their state survives a checkpoint."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from coordinator_service.engine import checkpoint
from coordinator_service.policy.server_opt import ServerOptimizer, ServerOptimizerConfig
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
