"""Secure aggregation on the coordinator: the SecAgg+ graph, and the settings that cannot go with it because they
would have to see one update."""

from __future__ import annotations

import pytest

from coordinator_service import settings as run_settings
from coordinator_service.engine.secure import SecureSettings, neighbour_graph


@pytest.mark.parametrize("workers, degree", [(5, 4), (10, 2), (10, 4), (11, 6), (3, 2), (50, 8)])
def test_every_worker_has_degree_neighbours_and_the_graph_is_symmetric(workers, degree):
    graph = neighbour_graph(workers, degree)
    assert sorted(graph) == list(range(1, workers + 1))
    for i, mine in graph.items():
        assert len(mine) == degree and i not in mine
        assert all(i in graph[j] for j in mine)


def test_the_graph_is_drawn_anew_each_round():
    assert len({tuple(sorted(neighbour_graph(20, 4)[1])) for _ in range(20)}) > 1


def test_the_default_is_secagg_with_the_smallest_majority_of_holders():
    s = SecureSettings()
    assert s.degree(5) == 4 and s.threshold_for(4) == 3  # 5 holders: 3 of them
    assert s.degree(3) == 2 and s.threshold_for(2) == 2
    plus = SecureSettings(neighbours=4)
    assert plus.degree(100) == 4 and plus.degree(4) == 3  # never more neighbours than there are others


@pytest.mark.parametrize(
    "layer, named",
    [
        ({"mode": "async"}, "mode async"),
        ({"aggregation": "median"}, "aggregation median"),
        ({"aggregation": "trimmed-mean"}, "aggregation trimmed-mean"),
        ({"local_seconds": 10}, "strategy fednova"),
        ({"compression": "int8"}, "compression int8"),
    ],
)
def test_secure_aggregation_refuses_what_needs_to_see_an_update(layer, named):
    with pytest.raises(run_settings.SettingsError, match=f"secure_aggregation does not go with {named}"):
        run_settings.merge({"secure_aggregation": True, **layer})


def test_secure_aggregation_goes_with_server_optimizers_fedprox_sampling_and_dp_sgd():
    s = run_settings.merge(
        {
            "secure_aggregation": True,
            "server_optimizer": "fedadam",
            "proximal_mu": 0.01,
            "fraction": 0.5,
            "secagg_neighbours": 4,
        }
    )
    assert s.privacy.secure_aggregation and s.privacy.secagg_neighbours == 4
    assert run_settings.merge({"secure_aggregation": True, "dp_sgd_noise_multiplier": 1.0}).privacy.dp_sgd


def test_an_odd_neighbour_count_is_refused():
    with pytest.raises(run_settings.SettingsError, match="secagg_neighbours must be even"):
        run_settings.merge({"secure_aggregation": True, "secagg_neighbours": 3})


# -- a round against fake workers that run the real worker session -------------------------------------------------

import asyncio  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from coordinator_service.engine.rounds import RoundRunner, TransferSettings  # noqa: E402
from coordinator_service.policy.strategy import FedAvg  # noqa: E402
from generated.fedpi.v1 import worker_pb2 as pb  # noqa: E402
from tests.coordinator_service.test_rounds import ARCH, FakeWorker, tiny_model  # noqa: E402
from worker_service.secagg import Session  # noqa: E402


class Masking(FakeWorker):
    """A fake worker whose secure-aggregation calls are the real worker's (worker_service.secagg.Session)."""

    session: Session

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.info.protocol_version = "1.13"

    async def secagg_keys(self, config):
        self.session = Session(config)
        return self.session.public_keys()

    async def secagg_shares(self, request):
        self.session.check_round(request.round_id)
        return self.session.shares(request.peers)

    async def get_masked_update(self, request, expected_bytes):
        step = self.step()
        deltas = [step[k].double().reshape(-1).numpy() for k, v in self.state.items() if v.is_floating_point()]
        coordinates = sum(len(d) for d in deltas)
        elements = self.session.elements(coordinates)
        yield pb.MaskedChunk(header=pb.MaskedUpdateHeader(round_id=request.round_id, elements=elements))
        chunks = self.session.masked_update(
            request.peers, lambda: deltas, coordinates, self.samples, request.chunk_size
        )
        for chunk in chunks:
            await asyncio.sleep(0)
            yield chunk

    async def secagg_unmask(self, request):
        return self.session.unmask(request)


def _secure_runner(model, max_update_ratio: float = 10.0, **secure) -> RoundRunner:
    return RoundRunner(
        model=model,
        architecture=ARCH,
        strategy=FedAvg(local_batches=2, batch_size=64),
        transfer=TransferSettings(chunk_size=7),
        secure=SecureSettings(chunk_bytes=64, **secure),
        max_update_ratio=max_update_ratio,
    )


@pytest.mark.parametrize("neighbours", [0, 2])
def test_a_secure_round_is_the_weighted_mean_of_the_steps_within_the_bound(neighbours):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    workers = [Masking(n, i, samples) for i, (n, samples) in enumerate([("a", 16), ("b", 120), ("c", 64),
                                                                          ("d", 1), ("e", 128)], start=1)]  # fmt: skip
    report = asyncio.run(_secure_runner(model, neighbours=neighbours).run_round(1, workers))
    assert [w.worker for w in report.workers] == ["a", "b", "c", "d", "e"] and not report.failures
    bound = report.secure_aggregation["quantization_error_bound"]
    total = sum(w.samples for w in workers)
    for k, v in model.state_dict().items():
        if not v.is_floating_point():
            assert torch.equal(v, before[k])  # integer tensors keep the global model's values
            continue
        for w in workers:
            w.state = before
        exact = before[k].double() + sum(w.samples * w.step()[k].double() for w in workers) / total
        slack = bound + torch.finfo(torch.float32).eps * exact.abs()
        assert bool(((v.double() - exact).abs() <= slack).all()), k


def test_a_worker_too_old_for_secure_aggregation_sits_the_round_out_with_the_upgrade_named():
    workers = [Masking(n, i) for i, n in enumerate("abcd", start=1)]
    workers[0].info.protocol_version = "1.11"
    for w in workers[1:]:
        w.info.protocol_version = "1.12"
    report = asyncio.run(_secure_runner(tiny_model()).run_round(1, workers))
    [failure] = report.failures
    assert failure.worker == "a" and failure.phase == "secure aggregation" and "1.12" in failure.reason
    assert [w.worker for w in report.workers] == ["b", "c", "d"]


def test_fewer_than_three_workers_fail_the_round_rather_than_give_an_update_away():
    from coordinator_service.engine.state import RoundFailed

    with pytest.raises(RoundFailed, match="at least 3 workers"):
        asyncio.run(_secure_runner(tiny_model()).run_round(1, [Masking("a", 1), Masking("b", 2)]))
    assert np  # (imported for the fake's deltas)


class BreaksMidUpload(Masking):
    """Its masked update stream breaks after a few chunks, part of it already in the sum."""

    async def get_masked_update(self, request, expected_bytes):
        from coordinator_service.engine.worker_errors import WorkerUnavailable

        count = 0
        async for chunk in super().get_masked_update(request, expected_bytes):
            if count == 4:
                raise WorkerUnavailable(self.name, "GetMaskedUpdate failed with UNAVAILABLE: connection reset")
            count += 1
            yield chunk


def test_an_upload_that_breaks_half_way_leaves_nothing_in_the_sum_and_its_masks_are_rebuilt():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    honest = [Masking(n, i, 32 * i) for i, n in enumerate("abcd", start=1)]
    broken = BreaksMidUpload("x", 9, 64)
    report = asyncio.run(_secure_runner(model).run_round(1, [*honest[:2], broken, *honest[2:]]))
    [failure] = report.failures
    assert failure.worker == "x" and failure.phase == "get_masked_update"
    assert report.secure_aggregation["dropped_after_sharing"] == ["x"]
    bound = report.secure_aggregation["quantization_error_bound"]
    total = sum(w.samples for w in honest)
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            for w in honest:
                w.state = before
            exact = before[k].double() + sum(w.samples * w.step()[k].double() for w in honest) / total
            assert bool(((v.double() - exact).abs() <= bound + 1.2e-7 * exact.abs()).all()), k


class Forging(Masking):
    """Masks integers of its own choosing instead of its quantised update: `coordinates` for every coordinate,
    `weight` for the weight (None: the honest one)."""

    def __init__(self, *args, coordinates=None, weight=None, **kw):
        super().__init__(*args, **kw)
        self.forged = (coordinates, weight)

    async def secagg_keys(self, config):
        answer = await super().secagg_keys(config)
        coordinates, weight = self.forged
        honest = self.session.quantizer

        class Forged(type(honest)):
            def quantize(self, delta, w, rng):
                q, clipped = honest.quantize(delta, w, rng)
                return (q if coordinates is None else np.full(len(q), coordinates, dtype=np.uint32)), clipped

            def weight_element(self, w):
                return honest.weight_element(w) if weight is None else np.array([weight], dtype=np.uint32)

        self.session.quantizer = Forged(honest.clip, honest.workers, honest.max_weight)
        return answer


@pytest.mark.parametrize(
    "forged, reason",
    [
        (dict(coordinates=2**30), "beyond the bound"),  # +2 clip x W / total weight on every coordinate
        (dict(weight=100_000), "not the 136 the workers reported"),
    ],
)
def test_a_worker_that_masks_integers_outside_the_range_fails_the_round_it_cannot_be_found_in(forged, reason):
    from coordinator_service.engine.state import RoundFailed

    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    workers = [Masking("a", 1, 32), Masking("b", 2, 32), Forging("c", 3, 40, **forged), Masking("d", 4, 32)]
    with pytest.raises(RoundFailed, match=reason):
        asyncio.run(_secure_runner(model, max_update_ratio=1.0).run_round(1, workers))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class OutOfPlace(Masking):
    """Its masked update skips a chunk: data arriving over the network is checked as it is folded."""

    async def get_masked_update(self, request, expected_bytes):
        count = 0
        async for chunk in super().get_masked_update(request, expected_bytes):
            count += 1
            if count != 3:  # header, first chunk, then the second one goes missing
                yield chunk


def test_a_masked_stream_with_a_chunk_out_of_place_is_refused_and_the_round_goes_on_without_it():
    honest = [Masking(n, i, 32) for i, n in enumerate("abc", start=1)]
    report = asyncio.run(_secure_runner(tiny_model()).run_round(1, [*honest, OutOfPlace("x", 9, 32)]))
    [failure] = report.failures
    assert failure.worker == "x" and failure.phase == "get_masked_update" and "out of place" in failure.reason
    assert report.secure_aggregation["dropped_after_sharing"] == ["x"]


# -- distributed DP: worker-level DP with secure aggregation, each worker noising its own update -------------------

from coordinator_service.policy.privacy import AdaptiveClip, GaussianMean  # noqa: E402
from fedpi.secagg.masks import DistributedNoise, Quantizer  # noqa: E402


class Scaled(Masking):
    """An honest step times `factor`."""

    def __init__(self, name, seed, factor: float):
        super().__init__(name, seed)
        self.factor = factor

    def step(self):
        return {k: v * self.factor if v.is_floating_point() else v for k, v in super().step().items()}


def _dp_runner(model, rule: GaussianMean, quorum: int, chunk_bytes: int = 256) -> RoundRunner:
    return RoundRunner(
        model=model,
        architecture=ARCH,
        strategy=FedAvg(local_batches=2, batch_size=64, min_workers=quorum, weighted=False),
        transfer=TransferSettings(chunk_size=4096),
        secure=SecureSettings(chunk_bytes=chunk_bytes),
        aggregation=rule,
        max_update_ratio=10.0,
    )


def _flat_norm(step: dict) -> float:
    return sum(float(v.double().pow(2).sum()) for v in step.values() if v.is_floating_point()) ** 0.5


def test_distributed_dp_is_the_dp_mean_of_the_clipped_steps_and_adaptive_clipping_learns_from_the_masked_count():
    """Noise too small to matter: the unmasked mean is x + sum(clip(d_i)) / expected within the rounding bound, and
    the clip moves by the count the workers masked, as computed here from the steps' norms."""
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    workers = [Scaled(n, i, f) for i, (n, f) in enumerate([("a", 1.0), ("b", 30.0), ("c", 2.0), ("d", 8.0)], 1)]
    for w in workers:
        w.state = before
    norms = [_flat_norm(w.step()) for w in workers]
    clip = sorted(norms)[1] * 1.01  # two within, two beyond
    rule = GaussianMean(clip, 1e-9, 5, AdaptiveClip(norm=clip, quantile=0.5, lr=0.3, count_stddev=1e-9))
    report = asyncio.run(_dp_runner(model, rule, quorum=4).run_round(1, workers))
    assert not report.failures and len(report.workers) == 4
    bound = report.secure_aggregation["quantization_error_bound"]
    for k, v in model.state_dict().items():
        if not v.is_floating_point():
            continue
        exact = before[k].double() + sum(min(1.0, clip / n) * w.step()[k].double() for n, w in zip(norms, workers)) / 5
        slack = 3 * bound + torch.finfo(torch.float32).eps * exact.abs()
        assert bool(((v.double() - exact).abs() <= slack).all()), k
    share = (2 - 2) / 2 / 5 + 0.5  # two within (+1/2 each), two beyond (-1/2 each)
    assert report.dp_clipping["unclipped_share"] == pytest.approx(share, abs=1e-6)
    assert rule.clip == pytest.approx(clip * np.exp(-0.3 * (share - 0.5)), rel=1e-9)
    assert "clipped" not in report.dp_clipping  # nobody but the workers knows who was clipped


@pytest.mark.parametrize("quorum, survivors", [(5, 5), (1, 3)])
def test_each_worker_adds_its_share_of_the_noise_so_the_sum_carries_what_the_configuration_says(quorum, survivors):
    """Five workers, nothing clipped: the unmasked mean's noise has deviation z (scale C + sqrt(d)) sqrt(5 / t) /
    (scale m), t = the quorum (at least 3); measured over the coordinates, and fresh every round."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(150, 150), torch.nn.Linear(150, 3))
    coordinates = sum(v.numel() for v in model.state_dict().values())
    noises = []
    for round_ in (1, 2):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        workers = [Scaled(n, i, 1.0) for i, n in enumerate("abcde", 1)]
        rule = GaussianMean(clip_norm=100.0, noise_multiplier=2.0, expected_workers=5)
        report = asyncio.run(_dp_runner(model, rule, quorum, chunk_bytes=1 << 16).run_round(round_, workers))
        assert len(report.workers) == 5
        for w in workers:
            w.state = before
        noise = torch.cat([(v.double() - before[k].double() - sum(w.step()[k].double() for w in workers) / 5).flatten()
                           for k, v in model.state_dict().items()])  # fmt: skip
        noises.append(noise)
        scale = Quantizer(1.0, 5, 1, DistributedNoise(100.0, 2.0, survivors, coordinates)).scale
        want = 2.0 * (scale * 100.0 + coordinates**0.5) * (5 / survivors) ** 0.5 / (scale * 5)
        assert noise.std().item() == pytest.approx(want, rel=0.03)
        assert report.dp_clipping["noise_std"] == pytest.approx(want, rel=1e-3)
        with torch.no_grad():  # the next round starts from the same model
            for k, v in model.state_dict().items():
                v.copy_(before[k])
    assert abs(torch.corrcoef(torch.stack(noises))[0, 1].item()) < 0.05


class NeverUploads(Masking):
    async def get_masked_update(self, request, expected_bytes):
        from coordinator_service.engine.worker_errors import WorkerUnavailable

        raise WorkerUnavailable(self.name, "GetMaskedUpdate failed with UNAVAILABLE")
        yield


def test_distributed_dp_unmasks_no_sum_of_fewer_workers_than_its_noise_was_split_among():
    """Quorum 1, so the noise is split among 3 (the fewest a secure round has); SecAgg+ with 2 neighbours could
    unmask 2 updates, but 2 would carry only 2/3 of the noise: the round fails instead."""
    from coordinator_service.engine.state import RoundFailed

    rule = GaussianMean(clip_norm=1.0, noise_multiplier=1.0, expected_workers=5)
    workers = [Masking("a", 1), Masking("b", 2), NeverUploads("c", 3), NeverUploads("d", 4), NeverUploads("e", 5)]
    runner = _dp_runner(tiny_model(), rule, quorum=1)
    runner.secure = SecureSettings(chunk_bytes=256, neighbours=2)
    with pytest.raises(RoundFailed, match="distributed DP noises a sum only when at least 3 are in it"):
        asyncio.run(runner.run_round(1, workers))


def test_a_worker_too_old_for_distributed_dp_sits_the_round_out_rather_than_send_its_update_un_noised():
    workers = [Masking(n, i) for i, n in enumerate("abcd", start=1)]
    workers[0].info.protocol_version = "1.12"  # secure aggregation, but it would ignore the noise it is asked for
    rule = GaussianMean(clip_norm=1.0, noise_multiplier=1.0, expected_workers=4)
    report = asyncio.run(_dp_runner(tiny_model(), rule, quorum=3).run_round(1, workers))
    [failure] = report.failures
    assert failure.worker == "a" and "1.13" in failure.reason and "distributed DP" in failure.reason
    assert [w.worker for w in report.workers] == ["b", "c", "d"]
