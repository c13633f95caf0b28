"""Partitioning and dataset loading."""

from __future__ import annotations

import numpy as np
import pytest

from fedpi import data


@pytest.mark.parametrize("scheme", data.PARTITION_SCHEMES)
@pytest.mark.parametrize("count", [1, 3, 7])
def test_partitions_are_disjoint_complete_and_reproducible(scheme, count):
    # Prepare
    labels = np.random.default_rng(5).integers(0, 10, size=1001)
    # Execute
    shards = [data.partition_indices(labels, i, count, scheme, seed=4) for i in range(count)]
    again = [data.partition_indices(labels, i, count, scheme, seed=4) for i in range(count)]
    # Assert
    joined = np.concatenate(shards)
    assert len(joined) == len(set(joined.tolist())) == len(labels)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))


def test_iid_depends_on_seed_and_contiguous_follows_file_order():
    labels = np.zeros(100, dtype=int)
    assert not np.array_equal(
        data.partition_indices(labels, 0, 3, "iid", 1), data.partition_indices(labels, 0, 3, "iid", 2)
    )
    assert data.partition_indices(labels, 1, 4, "contiguous").tolist() == list(range(25, 50))


def test_label_scheme_is_the_reference_non_iid_split():
    labels = np.arange(100) % 10
    groups = [sorted(set(labels[data.partition_indices(labels, i, 3, "labels")].tolist())) for i in range(3)]
    assert groups == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def _class_shares(labels, count, alpha, seed=0):
    """shares[k][c]: the fraction of class c that shard k holds."""
    shards = [labels[data.partition_indices(labels, k, count, "dirichlet", seed, alpha)] for k in range(count)]
    return np.array([[np.mean(s == c) * len(s) / np.sum(labels == c) for c in range(10)] for s in shards])


def test_dirichlet_skews_labels_by_alpha():
    labels = np.random.default_rng(1).integers(0, 10, size=10_000)
    skewed, even = _class_shares(labels, 3, 0.1), _class_shares(labels, 3, 1000.0)
    # alpha 0.1: most of each class sits with one worker; alpha 1000: every worker holds about a third of each class
    assert np.mean(skewed.max(axis=0)) > 0.8
    assert np.abs(even - 1 / 3).max() < 0.05


def test_dirichlet_gives_train_and_test_splits_the_same_proportions_and_follows_the_seed():
    train = np.random.default_rng(2).integers(0, 10, size=8_000)
    test = np.random.default_rng(3).integers(0, 10, size=2_000)
    assert np.abs(_class_shares(train, 3, 0.3) - _class_shares(test, 3, 0.3)).max() < 0.01
    assert not np.allclose(_class_shares(train, 3, 0.3, seed=0), _class_shares(train, 3, 0.3, seed=1))
    with pytest.raises(ValueError, match="alpha must be positive"):
        data.partition_indices(train, 0, 3, "dirichlet", 0, alpha=0)


@pytest.mark.parametrize("spec, expected", [("0/3", (0, 3)), ("2/3", (2, 3))])
def test_parse_partition(spec, expected):
    assert data.parse_partition(spec) == expected


@pytest.mark.parametrize("spec", ["3/3", "-1/3", "a/b", "1", "0/0"])
def test_parse_partition_rejects_nonsense(spec):
    with pytest.raises(ValueError, match="partition"):
        data.parse_partition(spec)


def _write_idx(path, array: np.ndarray, compress: bool) -> None:
    data.write_idx(path.with_name(path.name + ".gz") if compress else path, array)


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_read_from_idx_files_in_data_dir(tmp_path, compress):
    """gz or raw IDX files in --data-dir (torchvision's MNIST/raw layout) load without any download."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), compress)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n), compress)
    ds = data.load_dataset("mnist", tmp_path, download=False)
    assert (len(ds.train), len(ds.test)) == (12, 5)
    x, y = ds.train.batch(np.arange(4))
    assert x.shape == (4, 1, 28, 28) and y.shape == (4,)


def test_missing_mnist_says_which_files_to_put_where(tmp_path):
    with pytest.raises(data.DatasetUnavailable) as err:
        data.load_dataset("mnist", tmp_path, download=False)
    assert "train-images-idx3-ubyte.gz" in str(err.value) and str(tmp_path) in str(err.value)


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    path = tmp_path / "x-idx1-ubyte"
    path.write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\0" * 3)
    with pytest.raises(data.DatasetUnavailable, match="truncated"):
        data.read_idx(path)


def test_auto_falls_back_to_the_shipped_digits(tmp_path):
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        ds = data.load_dataset("auto", tmp_path, download=False)
    assert ds.name == "digits-5k" and (len(ds.train), len(ds.test)) == (4000, 1000)
    assert any(e["event"] == "dataset_fallback" for e in logs)


def test_mnist_10k_from_the_real_test_digits(shared_mnist_dir):
    ds = data.load_dataset("mnist-10k", shared_mnist_dir, download=False)
    assert (len(ds.train), len(ds.test)) == (8000, 2000)
    assert ds.train.images.dtype.is_floating_point is False


def test_fashion_mnist_from_debians_package(tmp_path):
    if not (data.DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    ds = data.load_dataset("fashion-mnist", tmp_path, download=False)
    assert (len(ds.train), len(ds.test)) == (60_000, 10_000)
    assert sorted(ds.test.labels.unique().tolist()) == list(range(10))
