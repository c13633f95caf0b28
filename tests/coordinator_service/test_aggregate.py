"""Streaming FedAvg against the exact weighted average of whole tensors."""

from __future__ import annotations

import pytest
import torch

from coordinator_service.engine.aggregate import WeightedSum
from fedpi.weights import serde


def _states(n: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        {
            "conv.weight": torch.randn(4, 3, 3, generator=gen),
            "bn.num_batches_tracked": torch.tensor(10 * (i + 1)),
            "half": torch.randn(7, generator=gen).to(torch.bfloat16),
            "empty": torch.zeros(0),
            "scalar": torch.randn((), generator=gen, dtype=torch.float64),
        }
        for i in range(n)
    ]


def _fold_streamed(states, weights, chunk_size):
    manifest = serde.manifest_of(states[0])
    total = WeightedSum(manifest)
    for state, w in zip(states, weights):
        payload = serde.WeightsPayload(state, round=1, architecture="a")
        fold = total.stream(w)
        for chunk in list(payload.chunks(chunk_size))[1:]:
            fold.add(chunk.data.data)
        fold.finish()
    out = {k: torch.empty_like(v) for k, v in states[0].items()}
    total.mean_into(out)
    return out


@pytest.mark.parametrize("chunk_size", [1, 5, 13, 1 << 20])
def test_streamed_fedavg_equals_exact_weighted_mean(chunk_size):
    """Unequal sample counts; chunks that split tensors and single elements."""
    # Prepare
    states, samples = _states(3), [3178.0, 1200.0, 64.0]
    # Execute
    out = _fold_streamed(states, samples, chunk_size)
    # Assert
    total = sum(samples)
    for name in ("conv.weight", "scalar"):
        exact = sum(s[name].double() * w for s, w in zip(states, samples)) / total
        torch.testing.assert_close(out[name].double(), exact, rtol=1e-6, atol=1e-6)
    exact_half = sum(s["half"].float() * w for s, w in zip(states, samples)) / total
    torch.testing.assert_close(out["half"], exact_half.to(torch.bfloat16))
    expected_count = round(sum(s["bn.num_batches_tracked"].item() * w for s, w in zip(states, samples)) / total)
    assert out["bn.num_batches_tracked"].item() == expected_count
    assert out["empty"].shape == (0,)


def test_weighting_matters():
    """A worker with more samples pulls the average towards itself (plain means would not)."""
    states = [{"w": torch.zeros(2)}, {"w": torch.ones(2)}]
    out = _fold_streamed(states, [1.0, 3.0], 4)
    torch.testing.assert_close(out["w"], torch.full((2,), 0.75))


def test_whole_state_dict_folding_matches_streaming():
    states, samples = _states(2), [5.0, 2.0]
    total = WeightedSum(serde.manifest_of(states[0]))
    for s, w in zip(states, samples):
        total.add_state_dict(s, w)
    out = {k: torch.empty_like(v) for k, v in states[0].items()}
    total.mean_into(out)
    streamed = _fold_streamed(states, samples, 9)
    for k in out:
        torch.testing.assert_close(out[k], streamed[k])


def test_nan_chunk_rejected_before_it_reaches_the_sum():
    manifest = serde.manifest_of({"w": torch.zeros(4)})
    total = WeightedSum(manifest)
    fold = total.stream(1.0)
    with pytest.raises(serde.NonFiniteWeights):
        fold.add(torch.tensor([1.0, float("inf"), 0.0, 0.0]).numpy().tobytes())


def test_incomplete_payload_is_not_counted():
    total = WeightedSum(serde.manifest_of({"w": torch.zeros(4)}))
    fold = total.stream(1.0)
    fold.add(torch.zeros(3).numpy().tobytes())
    with pytest.raises(serde.MalformedStream):
        fold.finish()
    assert total.contributors == 0


def test_weight_must_be_positive():
    with pytest.raises(ValueError):
        WeightedSum([]).stream(0.0)


def test_the_mean_does_not_depend_on_the_order_updates_arrive_in():
    """Summed in double precision, the same float32 updates give the same float32 model, bit for bit, whatever order
    they are folded in: a run repeats, and a resumed run ends where an uninterrupted one does."""
    gen = torch.Generator().manual_seed(0)
    updates = [({"w": torch.randn(20_000, generator=gen) * 10**i}, 1000 + 317 * i) for i in range(-1, 3)]
    manifest = serde.manifest_of(updates[0][0])
    means = []
    for order in ([0, 1, 2, 3], [3, 1, 0, 2], [2, 3, 1, 0]):
        total = WeightedSum(manifest)
        for i in order:
            total.add_state_dict(*updates[i])
        means.append(total.mean()[0].to(torch.float32))
    assert torch.equal(means[0], means[1]) and torch.equal(means[0], means[2])


def test_once_a_piece_is_refused_no_later_piece_of_that_update_enters_the_sum():
    """Pieces are queued for folding ahead of the one being folded: the ones after a refused piece must not count."""
    manifest = serde.manifest_of({"w": torch.zeros(8)})
    total = WeightedSum(manifest)
    update = torch.ones(8)
    update[4] = float("nan")  # in the third piece of two elements
    fold = total.stream(1.0)
    refused = []
    for piece in update.view(torch.uint8).split(8):  # every piece queued, as the round does
        try:
            fold.add(piece.numpy().tobytes())
        except serde.NonFiniteWeights:
            refused.append(piece)
    assert len(refused) == 1 and fold.failed
    assert total.accumulators[0].tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
