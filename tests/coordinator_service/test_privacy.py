"""Worker-level differential privacy (DP-FedAvg): the clipped, fixed-denominator mean against the formula computed
whole, the noise's measured standard deviation against the configuration, fresh noise every round, and the
accountant against Opacus's own figure computed here."""

from __future__ import annotations

import asyncio

import pytest
import torch
from torch import nn

from coordinator_service import settings as run_settings
from coordinator_service.engine.rounds import RoundRunner, TransferSettings
from coordinator_service.policy.privacy import Accountant, GaussianMean
from coordinator_service.policy.strategy import FedAvg
from generated.fedpi.v1 import worker_pb2 as pb
from tests.coordinator_service.test_rounds import ARCH, FakeWorker


class Far(FakeWorker):
    """An honest step times `factor`: far enough to be clipped."""

    def __init__(self, name, seed, factor: float):
        super().__init__(name, seed)
        self.factor = factor

    def step(self):
        return {k: v * self.factor for k, v in super().step().items()}


def _model(width: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, width), nn.Linear(width, 3))


def _runner(model, rule) -> RoundRunner:
    return RoundRunner(
        model=model,
        architecture=ARCH,
        strategy=FedAvg(local_batches=2, batch_size=64, min_workers=1, weighted=False),
        transfer=TransferSettings(chunk_size=4096, encoding=pb.CHUNK_ENCODING_RAW),
        aggregation=rule,
        max_update_ratio=1e6,
    )


def _state(model):
    return {k: v.detach().double().clone() for k, v in model.state_dict().items()}


def _norm(step):
    return sum(float(v.double().pow(2).sum()) for v in step.values()) ** 0.5


def test_updates_are_clipped_summed_alike_and_divided_by_the_workers_a_round_samples():
    """No noise: x + sum(clip(d_i)) / expected, with one of the four expected workers missing."""
    model = _model()
    g = _state(model)
    workers = [Far("a", 1, 1.0), Far("b", 2, 50.0), Far("c", 3, 2.0)]
    asyncio.run(
        _runner(model, GaussianMean(clip_norm=0.2, noise_multiplier=0.0, expected_workers=4)).run_round(1, workers)
    )
    for w in workers:
        w.state = {k: v.float() for k, v in g.items()}
    steps = [w.step() for w in workers]
    scales = [min(1.0, 0.2 / _norm(s)) for s in steps]
    assert scales[0] == 1.0 and scales[1] < 1.0  # one within the norm, one clipped
    for k, v in model.state_dict().items():
        want = g[k] + sum(sc * s[k].double() for sc, s in zip(scales, steps)) / 4
        torch.testing.assert_close(v.double(), want, rtol=1e-5, atol=1e-6)


def test_the_noise_has_the_configured_deviation_and_is_fresh_every_round():
    """sigma x clip / expected on every coordinate (about 25,000 of them), and two rounds' noises uncorrelated."""
    noises = []
    for round_ in (1, 2):
        model = _model(width=150)
        g = _state(model)
        workers = [FakeWorker("a", 1), FakeWorker("b", 2)]
        rule = GaussianMean(clip_norm=1e6, noise_multiplier=2.0, expected_workers=2)  # nothing is clipped
        asyncio.run(_runner(model, rule).run_round(round_, workers))
        noise = torch.cat(
            [
                (v.double() - g[k] - sum(w.step()[k].double() for w in workers) / 2).flatten()
                for k, v in model.state_dict().items()
            ]  # fmt: skip
        )
        noises.append(noise)
        assert noise.std().item() == pytest.approx(2.0 * 1e6 / 2, rel=0.03)
        assert abs(noise.mean().item()) < 3 * 1e6 / noise.numel() ** 0.5
    correlation = torch.corrcoef(torch.stack(noises))[0, 1].item()
    assert abs(correlation) < 0.05


def test_the_accountant_gives_opacus_s_epsilon_step_by_step_and_keeps_the_budget():
    from opacus.accountants import RDPAccountant

    accountant = Accountant(noise_multiplier=1.1, sample_rate=0.1, delta=1e-5, target_epsilon=2.0)
    reference = RDPAccountant()
    spent = []
    for rounds in range(1, 31):
        reference.step(noise_multiplier=1.1, sample_rate=0.1)
        assert accountant.epsilon(rounds) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
        spent.append(accountant.epsilon(rounds))
    assert accountant.epsilon(0) == 0.0 and spent == sorted(spent)
    last = max(r for r in range(1, 31) if spent[r - 1] <= 2.0)
    assert accountant.allows(last) and not accountant.allows(last + 1)
    assert Accountant(1.1, 0.1, 1e-5).allows(10_000)  # no budget


@pytest.mark.parametrize(
    "layer, named",
    [
        ({"mode": "async"}, "mode async"),
        ({"aggregation": "median"}, "aggregation median"),
        ({"local_seconds": 10}, "strategy fednova"),
    ],
)
def test_worker_level_dp_refuses_what_reads_updates_its_own_way(layer, named):
    with pytest.raises(run_settings.SettingsError, match=f"dp_noise_multiplier does not go with {named}"):
        run_settings.merge({"dp_noise_multiplier": 1.0, **layer})
