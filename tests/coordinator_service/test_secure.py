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
        ({"dp_noise_multiplier": 1.0}, "dp_noise_multiplier"),
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
        self.info.protocol_version = "1.12"

    async def secagg_keys(self, config):
        self.session = Session(config)
        return self.session.public_keys()

    async def secagg_shares(self, request):
        self.session.check_round(request.round_id)
        return self.session.shares(request.peers)

    async def get_masked_update(self, request, expected_bytes):
        step = self.step()
        deltas = [step[k].double().reshape(-1).numpy() for k, v in self.state.items() if v.is_floating_point()]
        elements = sum(len(d) for d in deltas) + 1
        yield pb.MaskedChunk(header=pb.MaskedUpdateHeader(round_id=request.round_id, elements=elements))
        for chunk in self.session.masked_update(request.peers, deltas, self.samples, request.chunk_size):
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
        (dict(coordinates=2**30), "beyond the distance bound"),  # +2 clip x W / total weight on every coordinate
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
