"""The round loop against fake workers, honest and malicious: the global model after a round is compared with the
aggregate of the good workers' updates computed whole, to float tolerance."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from torch import nn

from coordinator_service import settings as run_settings
from coordinator_service.control import launch
from coordinator_service.engine.rounds import RoundFailed, RoundRunner, TransferSettings
from coordinator_service.engine.worker_errors import WorkerUnavailable
from coordinator_service.policy.rules import Clipped, TrimmedMean, median, parse_aggregation, trimmed_mean
from coordinator_service.policy.server_opt import ServerOptimizer, ServerOptimizerConfig
from coordinator_service.policy.strategy import FedAvg
from fedpi.weights import serde
from generated.fedpi.v1 import worker_pb2 as pb

ARCH = "tiny"
SHARD = 1000


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))


class FakeWorker:
    """Speaks the WorkerClient interface the round loop uses. Honest by default: its update is the global model
    plus a fixed, worker-specific step. Subclasses misbehave."""

    def __init__(self, name: str, seed: int, samples: int = 128):
        self.name = self.address = name
        self.info = pb.WorkerInfo(worker_id=name, train_samples=SHARD)
        self.samples = samples
        self.seed = seed
        self.state: dict[str, torch.Tensor] = {}
        self.round_id = ""
        self.round = 0
        self.trained = False

    async def set_weights(self, stream: serde.Broadcast, total_bytes: int):
        chunks = [pb.WeightsChunk.FromString(message) for message in stream.receiver()]
        reader = serde.StreamReader(architecture=ARCH, expected=None)
        self.state = {k: v.clone() for k, v in serde.read_state_dict(reader, iter(chunks)).items()}
        header = chunks[0].header
        self.round_id, self.round, self.trained = header.round_id, header.round, False
        return stream.wire_bytes

    def step(self) -> dict[str, torch.Tensor]:
        return self.step_on(self.state)

    def step_on(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        return {
            k: (torch.randn(v.shape, generator=gen) * 0.01 if v.is_floating_point() else torch.ones_like(v))
            for k, v in state.items()
        }

    def update(self) -> dict[str, torch.Tensor]:
        return {k: v + self.step()[k] for k, v in self.state.items()}

    async def train(self, request: pb.TrainRequest, on_progress=None) -> pb.TrainResult:
        self.trained = True
        self.last_request = request
        return pb.TrainResult(round=request.round, round_id=request.round_id, samples=self.samples, batches=2)

    def payload(self) -> serde.WeightsPayload:
        return serde.WeightsPayload(
            self.update(), round=self.round, architecture=ARCH, round_id=self.round_id, trained=self.trained
        )

    async def get_weights(self, chunk_size: int, encoding: int, expected_bytes: int, digest_in_trailer=False):
        self.asked = encoding
        base = [t.reshape(-1) for t in self.state.values()] if encoding == pb.CHUNK_ENCODING_INT8_DELTA else None
        for chunk in self.payload().chunks(chunk_size, encoding, base=base):
            await asyncio.sleep(0)
            yield chunk


class Huge(FakeWorker):
    """Finite values that would overflow a float32 sum."""

    def update(self):
        return {k: torch.full_like(v, 1e36) if v.is_floating_point() else v for k, v in self.state.items()}


class InflatedSamples(FakeWorker):
    async def train(self, request, on_progress=None):
        result = await super().train(request)
        result.samples = 9_200_000_000_000_000_000
        return result


class Scaled(FakeWorker):
    """A boosted update (model replacement): the honest step times `factor`; a negative factor flips its sign."""

    def __init__(self, name, seed, factor: float = 40.0, **kw):
        super().__init__(name, seed, **kw)
        self.factor = factor

    def update(self):
        return {k: v + self.factor * self.step()[k] if v.is_floating_point() else v for k, v in self.state.items()}


class Untrained(FakeWorker):
    """Sends back the weights it was given, as if Train had never run (e.g. restarted in between)."""

    def payload(self):
        return serde.WeightsPayload(self.state, round=self.round, architecture=ARCH, round_id=self.round_id)


class OtherRun(FakeWorker):
    """A trained update for the same round number of another coordinator's run."""

    def payload(self):
        return serde.WeightsPayload(
            self.update(), round=self.round, architecture=ARCH, round_id="other/1.1", trained=True
        )


class DiesMidStream(FakeWorker):
    """Its first GetWeights stream breaks after two chunks; later ones fail at once (the process is gone)."""

    async def get_weights(self, chunk_size, encoding, expected_bytes, digest_in_trailer=False):
        for i, chunk in enumerate(self.payload().chunks(chunk_size, encoding)):
            if i == 3:
                raise WorkerUnavailable(self.name, "GetWeights failed with UNAVAILABLE: connection reset")
            yield chunk


def _runner(
    model, rule: str = "fedavg", chunk_size: int = 7, min_workers: int = 1, encoding: int = 0, **kw
) -> RoundRunner:
    return RoundRunner(
        model=model,
        architecture=ARCH,
        strategy=FedAvg(local_batches=2, batch_size=64, min_workers=min_workers),
        transfer=TransferSettings(chunk_size=chunk_size, encoding=encoding or pb.CHUNK_ENCODING_RAW),
        aggregation=parse_aggregation(rule),
        **kw,
    )


def _run(runner, workers):
    return asyncio.run(runner.run_round(1, workers))


def _expected(global_state, workers, combine) -> dict[str, torch.Tensor]:
    """The aggregate computed whole, from each good worker's update recomputed on the global model."""
    for w in workers:
        w.state = {k: v.clone() for k, v in global_state.items()}
    updates = [w.update() for w in workers]
    return {
        k: combine(torch.stack([u[k].double() for u in updates]), workers).to(v.dtype) for k, v in global_state.items()
    }


def _weighted_mean(stack, workers):
    w = torch.tensor([float(x.samples) for x in workers], dtype=torch.float64).reshape(-1, *[1] * (stack.dim() - 1))
    return (stack * w).sum(0) / w.sum()


def _assert_state(model, expected):
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6)
        else:
            assert v.item() == round(expected[k].double().item()), k


def _global(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_fedavg_equals_the_weighted_mean_of_the_updates():
    # Prepare
    model = tiny_model()
    g = _global(model)
    workers = [FakeWorker("a", 1, 16), FakeWorker("b", 2, 120), FakeWorker("c", 3, 64)]
    # Execute
    report = _run(_runner(model), workers)
    # Assert
    assert not report.failures
    _assert_state(model, _expected(g, workers, _weighted_mean))


@pytest.mark.parametrize("encoding", [pb.CHUNK_ENCODING_FP16, pb.CHUNK_ENCODING_BF16, pb.CHUNK_ENCODING_INT8_DELTA])
def test_compressed_updates_are_averaged_as_decoded_and_workers_that_do_not_offer_one_send_raw(encoding):
    """The aggregate is the weighted mean of each update as its encoding delivers it, decoded here on its own; a
    worker whose GetInfo does not offer the encoding is asked for raw weights instead."""
    model = tiny_model()
    g = _global(model)
    workers = [FakeWorker("a", 1, 16), FakeWorker("b", 2, 120), FakeWorker("old", 3, 64)]
    for w in workers[:2]:
        w.info.chunk_encodings[:] = serde.SUPPORTED_ENCODINGS
    workers[2].info.chunk_encodings[:] = [pb.CHUNK_ENCODING_RAW, pb.CHUNK_ENCODING_ZLIB]
    runner = _runner(model, chunk_size=12, encoding=encoding)
    report = _run(runner, workers)
    assert not report.failures and [w.asked for w in workers] == [encoding, encoding, pb.CHUNK_ENCODING_RAW]
    decoded = []
    for w in workers:
        base = [t.reshape(-1) for t in g.values()]
        payload = serde.WeightsPayload(w.update(), round=1, architecture=ARCH)
        reader = serde.StreamReader(architecture=ARCH, expected=payload.manifest, encodings=(w.asked,), base=base)
        decoded.append(serde.read_state_dict(reader, payload.chunks(12, w.asked, base=base)))
    expected = {
        k: _weighted_mean(torch.stack([d[k].double() for d in decoded]), workers).to(v.dtype) for k, v in g.items()
    }
    _assert_state(model, expected)
    raw = _expected(g, workers, _weighted_mean)["0.weight"]
    assert not torch.allclose(raw, expected["0.weight"], rtol=0, atol=1e-7)  # the encoding did change the values
    sent = report.workers[0]
    assert sent.bytes_received < sent.bytes_sent == serde.WeightsPayload(g, round=1, architecture=ARCH).total_bytes


@pytest.mark.parametrize(
    "bad, phase, reason",
    [
        (Huge, "get_weights", "lies more than"),
        (InflatedSamples, "train", "training samples"),
        (Untrained, "get_weights", "untrained weights"),
        (OtherRun, "get_weights", "other/1.1"),
        (DiesMidStream, "get_weights", "UNAVAILABLE"),
    ],
)
def test_a_bad_update_is_refused_and_the_average_is_of_the_good_ones(bad, phase, reason):
    # Prepare
    model = tiny_model()
    g = _global(model)
    good = [FakeWorker("a", 1, 64), FakeWorker("b", 2, 120)]
    workers = [good[0], bad("mallory", 9), good[1]]
    # Execute
    report = _run(_runner(model), workers)
    # Assert
    [failure] = report.failures
    assert (failure.worker, failure.phase) == ("mallory", phase) and reason in failure.reason
    assert sorted(w.worker for w in report.workers) == ["a", "b"]
    _assert_state(model, _expected(g, good, _weighted_mean))
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_update_bound_is_relative_to_the_global_model():
    """A step of 40x the honest one is within a 10x-norm bound, and outside a tight one."""
    for ratio, refused in ((10.0, []), (0.2, ["m"])):
        report = _run(_runner(tiny_model(), max_update_ratio=ratio), [FakeWorker("a", 1), Scaled("m", 2)])
        assert [f.worker for f in report.failures] == refused


def test_below_quorum_the_round_fails_and_the_model_is_unchanged():
    model = tiny_model()
    g = _global(model)
    with pytest.raises(RoundFailed, match="below the quorum"):
        _run(_runner(model, min_workers=2), [FakeWorker("a", 1), Huge("m", 2)])
    for k, v in model.state_dict().items():
        assert torch.equal(v, g[k])


class Big(FakeWorker):
    """An update of float32's largest values (within a deliberately absurd bound)."""

    def update(self):
        return {k: torch.full_like(v, 3e38) if v.is_floating_point() else v for k, v in self.state.items()}


def test_sums_that_overflow_float32_are_exact_in_double_precision():
    model = tiny_model()
    _run(_runner(model, max_update_ratio=math.inf), [Big("a", 1), Big("b", 2)])
    assert all(torch.equal(v, torch.full_like(v, 3e38)) for v in model.state_dict().values() if v.is_floating_point())


def test_a_non_finite_aggregate_is_never_installed():
    """A server step twice the aggregate's distance takes 3e38 past float32's largest value: refused."""
    model = tiny_model()
    g = _global(model)
    step = ServerOptimizer(ServerOptimizerConfig(name="fedavgm", lr=2.0, beta1=0.0))
    with pytest.raises(RoundFailed, match="NaN or Inf"):
        _run(_runner(model, max_update_ratio=math.inf, server_optimizer=step), [Big("a", 1), Big("b", 2)])
    for k, v in model.state_dict().items():
        assert torch.equal(v, g[k])


def _median(stack, workers):
    return median(stack)


def _trimmed(k):
    return lambda stack, workers: trimmed_mean(stack, k)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1 << 20])
@pytest.mark.parametrize(
    "rule, combine", [("median", _median), ("trimmed-mean", _trimmed(1)), ("trimmed-mean:2", _trimmed(2))]
)
def test_coordinate_wise_rules_equal_the_whole_model_computation(rule, combine, chunk_size):
    # Prepare
    model = tiny_model()
    g = _global(model)
    workers = [FakeWorker(n, i) for i, n in enumerate("abcde")]
    # Execute
    _run(_runner(model, rule, chunk_size=chunk_size), workers)
    # Assert
    _assert_state(model, _expected(g, workers, combine))


def test_whole_model_median_of_an_even_count_is_the_mean_of_the_middle_two():
    stack = torch.tensor([[1.0], [5.0], [2.0], [4.0]])
    assert median(stack).item() == 3.0
    assert trimmed_mean(stack, 1).item() == 3.0


def test_median_walk_restarts_without_a_worker_that_dies_mid_stream():
    model = tiny_model()
    g = _global(model)
    good = [FakeWorker(n, i) for i, n in enumerate("abcd")]
    report = _run(_runner(model, "median"), [*good[:2], DiesMidStream("m", 7), *good[2:]])
    assert [(f.worker, f.phase) for f in report.failures] == [("m", "get_weights")]
    _assert_state(model, _expected(g, good, _median))


def test_clipped_fedavg_scales_far_updates_onto_the_clip_norm():
    # Prepare: honest steps have norm ~0.01 * sqrt(n); the boosted one is 40 times that.
    model = tiny_model()
    g = _global(model)
    workers = [FakeWorker("a", 1, 64), FakeWorker("b", 2, 64), Scaled("m", 3, samples=64)]
    ref = torch.cat([v.double().reshape(-1) for v in g.values() if v.is_floating_point()])

    def clipped(stack, ws):
        deltas = [
            torch.cat(
                [w.update()[k].double().reshape(-1) - g[k].double().reshape(-1) for k in g if g[k].is_floating_point()]
            )
            for w in ws
        ]
        norm = sorted(float(d.norm()) for d in deltas)[1]  # the median distance
        return norm, deltas

    for w in workers:
        w.state = {k: v.clone() for k, v in g.items()}
    norm, deltas = clipped(None, workers)
    scaled = [d * min(1.0, norm / float(d.norm())) for d in deltas]
    expected_flat = ref + sum(scaled) / 3
    # Execute
    _run(_runner(model, "clipped"), workers)
    # Assert
    got = torch.cat([v.double().reshape(-1) for v in model.state_dict().values() if v.is_floating_point()])
    torch.testing.assert_close(got, expected_flat, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "attacker", [lambda: Scaled("m", 9, factor=40.0), lambda: Scaled("m", 9, factor=-40.0), lambda: Huge("m", 9)]
)
@pytest.mark.parametrize("rule", ["median", "trimmed-mean", "clipped"])
def test_robust_rules_stay_near_the_honest_aggregate_with_one_poisoner_of_five(rule, attacker):
    # Prepare
    honest = [FakeWorker(n, i) for i, n in enumerate("abcd")]
    clean = tiny_model()
    _run(_runner(clean, "fedavg"), honest)
    poisoned_avg, robust = tiny_model(), tiny_model()
    # Execute
    _run(_runner(poisoned_avg, "fedavg", max_update_ratio=math.inf), [*honest, attacker()])
    # Median and trimmed mean need no update bound; clipping scales a far update back, which in a float32 sum is
    # exact only for updates the bound lets in (a 1e36 update is refused by it).
    ratio = 10.0 if rule == "clipped" else math.inf
    _run(_runner(robust, rule, max_update_ratio=ratio), [*honest, attacker()])
    # Assert: distance from the clean aggregate, relative to an honest step (~0.01 per coordinate).

    def gap(m):
        return max(
            float((a - b).abs().max())
            for (k, a), b in zip(m.state_dict().items(), clean.state_dict().values())
            if a.is_floating_point()
        )

    assert gap(robust) < 0.03
    assert gap(poisoned_avg) > 0.05 or not all(torch.isfinite(v).all() for v in poisoned_avg.state_dict().values())


def test_aggregation_specs_parse_and_bad_ones_say_what_is_accepted():
    assert parse_aggregation("trimmed-mean:2") == TrimmedMean(trim=2)
    assert parse_aggregation("clipped:0.5") == Clipped(clip_norm=0.5)
    assert str(parse_aggregation("median")) == "median"
    for bad in ("krum", "median:3", "trimmed-mean:x", "clipped:-1"):
        with pytest.raises(ValueError, match="choose from fedavg|takes"):
            parse_aggregation(bad)


def test_the_local_learning_rate_decays_per_round():
    strategy = FedAvg(learning_rate=0.1, lr_decay=0.5)
    assert [strategy.configure_train(r, 0).learning_rate for r in (1, 2, 3)] == [0.1, 0.05, 0.025]
    assert FedAvg(learning_rate=0.1, lr_schedule="constant", lr_decay=0.5).configure_train(3, 0).learning_rate == 0.1


def test_the_cosine_schedule_anneals_over_the_run_and_holds_its_last_rate_after_it():
    """The rate, and the distillation's beta with it."""
    strategy = FedAvg(learning_rate=0.1, lr_schedule="cosine", rounds=4, not_true_distillation=0.8)
    requests = [strategy.configure_train(r, 0) for r in (1, 2, 3, 4, 5, 9)]
    # 0.1 x (1 + cos(pi (r - 1) / 4)) / 2, written out
    expected = [0.1, 0.1 * (1 + 0.5**0.5) / 2, 0.05, 0.1 * (1 - 0.5**0.5) / 2]
    assert [q.learning_rate for q in requests] == pytest.approx(expected + expected[-1:] * 2, rel=1e-12)
    betas = [0.8 * rate / 0.1 for rate in expected + expected[-1:] * 2]
    assert [q.not_true_distillation for q in requests] == pytest.approx(betas, rel=1e-12)
    constant = FedAvg(learning_rate=0.1, lr_schedule="constant", rounds=4, not_true_distillation=0.8)
    assert {constant.configure_train(r, 0).not_true_distillation for r in (1, 4, 9)} == {0.8}


@pytest.mark.parametrize(
    "layers, schedule, rates",
    [
        ([], "cosine", [0.05, 0.05 * 0.75, 0.05 * 0.25]),  # (1 + cos(pi (r - 1) / 3)) / 2 = 1, 3/4, 1/4
        ([{"lr_decay": 0.5}], "exponential", [0.05, 0.025, 0.0125]),
        ([{"lr_schedule": "constant"}], "constant", [0.05, 0.05, 0.05]),
        ([run_settings.preset_layer("seed")], "constant", [0.01, 0.01, 0.01]),
    ],
)
def test_a_runs_settings_pick_the_schedule_and_its_length(layers, schedule, rates):
    """The settings a run is given (auto: cosine unless lr_decay is set) reach the strategy with the run's rounds."""
    settings = run_settings.merge(*layers, {"rounds": 3})
    strategy = launch.strategy(settings, 3)
    assert settings.training.effective_lr_schedule == schedule
    assert [strategy.configure_train(r, 0).learning_rate for r in (1, 2, 3)] == pytest.approx(rates, rel=1e-12)


def test_lr_decay_with_a_schedule_it_does_not_apply_to_is_refused():
    with pytest.raises(run_settings.SettingsError, match="lr_decay applies to lr_schedule exponential, not cosine"):
        run_settings.merge({"lr_schedule": "cosine", "lr_decay": 0.9})


@pytest.mark.parametrize(
    "older, newer, option, named",
    [
        ("1.1", "1.2", {"proximal_mu": 0.01}, ["FedProx", "1.2"]),
        ("1.7", "1.8", {"not_true_distillation": 1.0}, ["--not-true-distillation", "1.8"]),
        ("1.12", "1.13", {"feddyn_alpha": 0.1}, ["FedDyn", "1.13"]),
    ],
)
def test_an_option_is_sent_only_to_workers_that_understand_it(older, newer, option, named):
    """An older worker would ignore the field silently; it is refused instead, naming the upgrade (and, for an option
    on by default, the flag that turns it off)."""
    old, new = FakeWorker("old", 1), FakeWorker("new", 2)
    old.info.protocol_version, new.info.protocol_version = older, newer
    runner = RoundRunner(
        model=tiny_model(),
        architecture=ARCH,
        strategy=FedAvg(local_batches=2, batch_size=64, **option),
        transfer=TransferSettings(chunk_size=7),
    )
    report = asyncio.run(runner.run_round(1, [old, new]))
    [failure] = report.failures
    assert failure.worker == "old" and failure.phase == "train"
    assert all(word in failure.reason for word in named), failure.reason
    assert [w.worker for w in report.workers] == ["new"]
    [(field, value)] = option.items()
    assert getattr(new.last_request, field) == value


def test_round_started_names_the_model_by_its_digest_hashed_only_once_every_send_has_ended():
    """Hashing a large model beside the sends would slow them: round_started waits until the model is out."""
    from structlog.testing import capture_logs

    logged_when_sent = []

    class SlowSend(FakeWorker):
        async def set_weights(self, stream, total_bytes):
            await asyncio.sleep(0.05 * self.seed)
            logged_when_sent.append([e["event"] for e in logs])
            return await super().set_weights(stream, total_bytes)

    model = tiny_model()
    expected = serde.WeightsPayload(model.state_dict(), round=1, architecture=ARCH).digest
    with capture_logs() as logs:
        _run(_runner(model), [SlowSend("a", 1), SlowSend("b", 2), SlowSend("c", 3)])
    assert len(logged_when_sent) == 3 and not any("round_started" in events for events in logged_when_sent)
    started = [e for e in logs if e["event"] == "round_started"]
    assert len(started) == 1 and started[0]["model_digest"] == expected
    events = [e["event"] for e in logs]
    assert events.index("round_started") < events.index("worker_train_finished")


@pytest.mark.parametrize("epsilon", [float("nan"), float("inf"), -1.0])
def test_a_dp_sgd_epsilon_that_is_not_a_number_at_least_0_is_refused(epsilon):
    class BadEpsilon(FakeWorker):
        async def train(self, request, on_progress=None):
            result = await super().train(request)
            result.dp_epsilon = epsilon
            return result

    model = tiny_model()
    report = _run(_runner(model), [FakeWorker("a", 1), BadEpsilon("b", 2)])
    assert [(f.worker, f.phase) for f in report.failures] == [("b", "train")]
    assert "not a number >= 0" in report.failures[0].reason
