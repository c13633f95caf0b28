"""Worker-level differential privacy (DP-FedAvg): the clipped, fixed-denominator mean against the formula computed
whole, the noise's measured standard deviation against the configuration, fresh noise every round, and the
accountant against Opacus's own figure computed here."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from torch import nn

from coordinator_service import settings as run_settings
from coordinator_service.engine.rounds import RoundRunner, TransferSettings
from coordinator_service.policy.privacy import Accountant, AdaptiveClip, GaussianMean
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


def test_adaptive_clipping_follows_its_formula_round_by_round():
    """Noise too small to matter: each round clips to its clip norm C, and C moves to
    C exp(-lr ((unclipped - clipped) / 2 / expected + 1/2 - quantile)), as computed here from the updates' norms."""
    model = _model()
    workers = [Far("a", 1, 1.0), Far("b", 2, 50.0), Far("c", 3, 2.0), Far("d", 4, 8.0)]
    adaptive = AdaptiveClip(norm=0.3, quantile=0.5, lr=0.3, count_stddev=1e-9)
    rule = GaussianMean(clip_norm=0.3, noise_multiplier=1e-9, expected_workers=5, adaptive=adaptive)
    runner = _runner(model, rule)
    clip = 0.3
    for round_ in (1, 2, 3):
        g = _state(model)
        asyncio.run(runner.run_round(round_, workers))
        for w in workers:
            w.state = {k: v.float() for k, v in g.items()}
        steps = [w.step() for w in workers]
        norms = [_norm(s) for s in steps]
        for k, v in model.state_dict().items():
            want = g[k] + sum(min(1.0, clip / n) * s[k].double() for n, s in zip(norms, steps)) / 5
            torch.testing.assert_close(v.double(), want, rtol=1e-5, atol=1e-6)
        unclipped = sum(n <= clip for n in norms)
        share = (unclipped - (4 - unclipped)) / 2 / 5 + 0.5
        assert rule.last["clip_norm"] == pytest.approx(clip, rel=1e-5)
        assert rule.last["unclipped_share"] == pytest.approx(share, abs=1e-4)
        clip *= math.exp(-0.3 * (share - 0.5))
        assert adaptive.norm == pytest.approx(clip, rel=1e-9)
    assert 0 < sum(n <= 0.3 for n in norms) < 4  # the clip norm sat among the updates' norms at the start


def test_adaptive_clipping_moves_towards_the_quantile_of_the_updates_norms():
    """All updates far beyond the clip: it grows; all far within: it shrinks, geometrically either way."""
    for factor, grows in ((50.0, True), (1e-3, False)):
        model = _model()
        workers = [Far("a", 1, factor), Far("b", 2, factor), Far("c", 3, factor)]
        adaptive = AdaptiveClip(norm=0.05, quantile=0.5, lr=0.2, count_stddev=1e-9)
        rule = GaussianMean(clip_norm=0.05, noise_multiplier=1e-9, expected_workers=3, adaptive=adaptive)
        runner = _runner(model, rule)
        clips = []
        for round_ in (1, 2, 3):
            asyncio.run(runner.run_round(round_, workers))
            clips.append(adaptive.norm)
        ratio = math.exp(0.2 * 0.5) if grows else math.exp(-0.2 * 0.5)
        assert clips == pytest.approx([0.05 * ratio, 0.05 * ratio**2, 0.05 * ratio**3], rel=1e-9)


def test_adaptive_clipping_splits_the_noise_so_that_both_cost_what_the_noise_multiplier_says():
    """The sum's noise multiplier and the count's (sensitivity 1/2) compose, order by order in Renyi DP as Opacus
    computes it, to exactly the run's noise multiplier; the sum's noise and the count's are measured."""
    from opacus.accountants.analysis.rdp import compute_rdp

    adaptive = AdaptiveClip(norm=1.0, count_stddev=1.5)
    z_sum = adaptive.sum_noise_multiplier(1.2)
    orders = [1.5, 2, 4, 8, 16, 64]
    total = compute_rdp(q=1.0, noise_multiplier=z_sum, steps=1, orders=orders)
    total += compute_rdp(q=1.0, noise_multiplier=2 * 1.5, steps=1, orders=orders)  # sensitivity 1/2
    assert total == pytest.approx(compute_rdp(q=1.0, noise_multiplier=1.2, steps=1, orders=orders), rel=1e-9)
    with pytest.raises(ValueError, match="must exceed half the noise multiplier"):
        AdaptiveClip(norm=1.0, count_stddev=0.6).sum_noise_multiplier(1.2)

    model = _model(width=150)
    g = _state(model)
    workers = [FakeWorker("a", 1), FakeWorker("b", 2)]
    rule = GaussianMean(1e6, 2.0, 2, AdaptiveClip(norm=1e6, count_stddev=2.0))  # nothing is clipped
    asyncio.run(_runner(model, rule).run_round(1, workers))
    noise = torch.cat(
        [
            (v.double() - g[k] - sum(w.step()[k].double() for w in workers) / 2).flatten()
            for k, v in model.state_dict().items()
        ]  # fmt: skip
    )
    assert noise.std().item() == pytest.approx(rule.sum_noise_multiplier * 1e6 / 2, rel=0.03)
    assert rule.sum_noise_multiplier == pytest.approx((2.0**-2 - 4.0**-2) ** -0.5)
    generator = torch.Generator().manual_seed(5)
    draws = torch.tensor([rule.adaptive.count_noise(generator) for _ in range(20_000)])
    assert draws.std().item() == pytest.approx(2.0, rel=0.03)


def test_the_adaptive_clip_is_state_a_checkpoint_keeps():
    rule = GaussianMean(0.1, 1.0, 3, AdaptiveClip(norm=0.1))
    rule.adaptive.norm = 0.37
    other = GaussianMean(0.1, 1.0, 3, AdaptiveClip(norm=0.1))
    other.load_state_dict(rule.state_dict())
    assert other.clip == 0.37
    fixed = GaussianMean(0.1, 1.0, 3)
    assert fixed.state_dict() == {} and fixed.clip == 0.1


def test_adaptive_clipping_refuses_count_noise_that_leaves_the_sum_none():
    with pytest.raises(run_settings.SettingsError, match="dp_clipped_count_stddev 0.4 must exceed half"):
        run_settings.merge({"dp_noise_multiplier": 1.0, "dp_clip_quantile": 0.5, "dp_clipped_count_stddev": 0.4})
    assert run_settings.merge({"dp_noise_multiplier": 1.0, "dp_clip_quantile": 0.5}).privacy.count_stddev(5) == 1.0
    assert run_settings.merge({"dp_noise_multiplier": 1.0, "dp_clip_quantile": 0.5}).privacy.count_stddev(100) == 5.0


def test_against_one_who_knows_who_was_sampled_sampling_amplifies_nothing():
    from opacus.accountants import RDPAccountant

    accountant = Accountant(noise_multiplier=1.1, sample_rate=0.1, delta=1e-5)
    reference = RDPAccountant()
    for _ in range(5):
        reference.step(noise_multiplier=1.1, sample_rate=1.0)
    assert accountant.unsampled(5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    assert accountant.unsampled(5) > accountant.epsilon(5)
