"""The task API: what fedpi trains. A task is a model, the data each worker trains on, the loss of one batch and
how a model is scored. Everything else (transport, integrity checks, handshake, aggregation, faults) is fedpi's and
works the same for every task.

A task is a subclass of `Task` in any importable package, chosen with `--task` (or FEDPI_TASK) on the coordinator and
on every worker, either by the name it is registered under in the `fedpi.tasks` entry-point group or as
`module:Class`. fedpi's own MNIST-like task is registered the same way, as `mnist` (fedpi/mnist_task.py).

The smallest task (docs/tasks.md):

    class SensorTask(Task):
        name = "sensor"
        version = "1.0"

        def build_model(self):
            return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 3))

        def load_dataset(self):
            x, y = read_my_files(self.data_dir)            # the whole dataset; each worker keeps its share
            return TensorDataset(x[:800], y[:800]), TensorDataset(x[800:], y[800:])
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Mapping
from importlib import import_module, metadata
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Subset, TensorDataset, default_collate

from fedpi import data as datasets
from fedpi.weights import serde

ENTRY_POINT_GROUP = "fedpi.tasks"
from fedpi.names import DEFAULT_TASK  # noqa: E402,F401 - re-exported


class TaskError(Exception):
    """A task that cannot be found, imported, built or loaded; the message says which and why."""


class StepResult(NamedTuple):
    """One training batch: the loss to minimise (a scalar tensor), how many samples the model got right (for the
    training accuracy fedpi reports; 0 if the task has no such notion) and how many samples the batch held.

    A classifier also gives the batch's inputs, the model's class scores (logits or log-probabilities, one row per
    sample) and the class labels: with them fedpi can add not-true distillation to the loss (docs/guide.md), which
    keeps a worker that sees only some classes from forgetting the others. Without them it trains on `loss` alone."""

    loss: torch.Tensor
    correct: int
    samples: int
    inputs: Any = None
    scores: torch.Tensor | None = None
    labels: torch.Tensor | None = None


class Evaluation(NamedTuple):
    """A model's mean loss and accuracy on a split: the two figures the protocol carries."""

    loss: float
    accuracy: float


class Partition(NamedTuple):
    """Which share of a dataset a worker trains on: shard `index` of `count`, cut by `scheme` (see
    fedpi.data.partition_indices). The coordinator's held-out test set is Partition.whole()."""

    # The task API's names; they shadow tuple.index and tuple.count, which nothing here calls.
    index: int = 0  # type: ignore[assignment]
    count: int = 1  # type: ignore[assignment]
    scheme: str = "iid"
    seed: int = 0
    alpha: float = datasets.DEFAULT_DIRICHLET_ALPHA

    @classmethod
    def whole(cls) -> Partition:
        return cls()

    def describe(self) -> str:
        scheme = self.scheme + (f" alpha={self.alpha:g}" if self.scheme == "dirichlet" else "")
        return f"{self.index}/{self.count} {scheme} seed={self.seed}"

    def indices(self, split: Any) -> np.ndarray:
        """This share's indices into `split`; the label-aware schemes read its labels (see labels_of)."""
        labels = labels_of(split) if self.scheme in ("labels", "dirichlet") else np.zeros(len(split))
        return datasets.partition_indices(labels, self.index, self.count, self.scheme, self.seed, self.alpha)

    def apply(self, split: Any) -> Any:
        """This share of `split`, of the same kind where fedpi knows how to cut it (fedpi Splits, TensorDatasets),
        else a torch Subset."""
        if self.count == 1:
            return split
        index = self.indices(split)
        if hasattr(split, "subset"):
            return split.subset(index)
        if isinstance(split, TensorDataset):
            idx = torch.from_numpy(index.astype(np.int64))
            return TensorDataset(*(t[idx] for t in split.tensors))
        return Subset(split, index.tolist())


def labels_of(split: Any) -> np.ndarray:
    """Class labels of a split: fedpi Splits and TensorDatasets (last tensor), datasets with `targets` (torchvision),
    else the second item of every sample (slow, but any map-style dataset works)."""
    if isinstance(split, TensorDataset):
        return split.tensors[-1].numpy()
    for attr in ("labels", "targets"):
        if hasattr(split, attr):
            return np.asarray(getattr(split, attr))
    return np.asarray([int(split[i][1]) for i in range(len(split))])


def batch_of(split: Any, index: torch.Tensor) -> Any:
    """The samples at `index` as one batch: split.batch(index) when the split makes its own batches (fedpi Splits),
    indexed tensors for a TensorDataset, else torch's default_collate of the samples."""
    if hasattr(split, "batch"):
        return split.batch(index)
    if isinstance(split, TensorDataset):
        return tuple(t[index] for t in split.tensors)
    return default_collate([split[i] for i in index.tolist()])


class Task(abc.ABC):
    """Subclass this: set `name` and `version`, implement build_model() and load_dataset() (or load_data()).

    Override train_step(), criterion() or evaluate() when the default (classification: cross-entropy on the
    model's output and targets, accuracy by argmax) does not fit. Batches are whatever the splits yield; the
    defaults expect (inputs, targets).
    """

    #: How the task is named in the handshake; coordinator and workers must run the same.
    name: ClassVar[str] = ""
    #: Your task's version, shown in the handshake. Bump it when the model changes; fedpi compares the model's
    #: manifest itself, so two versions with the same tensors still train together.
    version: ClassVar[str] = "0"

    def __init__(self, data_dir: str | Path = "data", download: bool = True):
        self.data_dir = Path(data_dir)  # --data-dir: where the task's files are (FEDPI_DATA_DIR=/data in the image)
        self.download = download  # False with --no-download: read local files only

    @property
    def architecture(self) -> str:
        """The model name carried in every weight stream's header."""
        return self.name

    @property
    def data_name(self) -> str:
        """The dataset name workers report in GetInfo."""
        return self.name

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh model. fedpi seeds torch's RNG first, so every process building it agrees on the weights."""

    def load_dataset(self) -> tuple[Any, Any]:
        """The whole dataset as (train, test) splits: map-style datasets (len, [i]), e.g. a TensorDataset. The
        default load_data() gives each worker its share of both."""
        raise NotImplementedError(f"task {self.name!r}: implement load_dataset() or load_data(partition)")

    def load_data(self, partition: Partition) -> tuple[Any, Any]:
        """This worker's (train, test) splits. Override it when each device has data of its own (then ignore
        `partition`, or use it to pick files)."""
        train, test = self.load_dataset()
        return partition.apply(train), partition.apply(test)

    def test_data(self) -> Any | None:
        """The coordinator's held-out test split, or None when it has no data (use --federated-evaluation)."""
        return self.load_data(Partition.whole())[1]

    def criterion(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss of a batch."""
        return F.cross_entropy(output, target)

    def train_step(self, model: nn.Module, batch: Any) -> StepResult:
        """Forward pass and loss of one training batch. fedpi adds FedProx's term, back-propagates and steps."""
        x, y = batch
        out = model(x)
        return StepResult(self.criterion(out, y), int((out.argmax(1) == y).sum()), len(y), x, out, y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: Any, batch_size: int = 1000) -> Evaluation:
        """Mean loss and accuracy of `model` on `split`."""
        model.eval()
        loss_sum, correct, n = 0.0, 0, len(split)
        for index in torch.arange(n).split(batch_size):
            x, y = batch_of(split, index)
            out = model(x)
            loss_sum += float(self.criterion(out, y)) * len(y)
            correct += int((out.argmax(1) == y).sum())
        return Evaluation(loss_sum / n, correct / n) if n else Evaluation(0.0, 0.0)

    def describe(self) -> str:
        return f"{self.name} {self.version}"


# -- models ------------------------------------------------------------------------------------------------------


def initial_model(task: Task, seed: int = 0) -> nn.Module:
    """The task's model with weights seeded by `seed`, checked to be something fedpi can send."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = task.build_model()
        except Exception as exc:
            raise TaskError(f"task {task.name!r}: build_model() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise TaskError(f"task {task.name!r}: build_model() returned {type(model).__name__}, not a torch nn.Module")
    check_wire_dtypes(task.name, model.state_dict())
    return model


def check_wire_dtypes(task_name: str, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Refuse, naming the tensor, a model whose state_dict holds something the wire format cannot carry."""
    if not state_dict:
        raise TaskError(f"task {task_name!r}: the model has no parameters or buffers to train")
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise TaskError(
                f"task {task_name!r}: state_dict entry {name!r} is a {type(tensor).__name__}, not a "
                f"tensor; fedpi sends tensors only"
            )
        try:
            serde.dtype_name(tensor.dtype)
        except serde.UnsupportedDtype:
            raise TaskError(
                f"task {task_name!r}: state_dict entry {name!r} has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                f"which fedpi's wire format cannot carry (it carries {', '.join(serde.supported_dtypes())}); convert "
                f"it, or keep it out of the state_dict (register_buffer(..., persistent=False))"
            ) from None
        if tensor.is_sparse or tensor.layout != torch.strided:
            raise TaskError(
                f"task {task_name!r}: state_dict entry {name!r} is a {tensor.layout} tensor; fedpi sends "
                f"dense tensors only"
            )


def fingerprint(manifest: list[serde.TensorMeta]) -> str:
    """A short digest of a model's tensor names, dtypes and shapes: two models can exchange weights exactly when
    their fingerprints agree."""
    text = "\n".join(f"{m.name}:{m.dtype}:{','.join(map(str, m.shape))}" for m in manifest)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- finding tasks -----------------------------------------------------------------------------------------------


def installed() -> dict[str, metadata.EntryPoint]:
    """Every task registered in the `fedpi.tasks` entry-point group, by name."""
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _builtin() -> dict[str, type[Task]]:
    # Also found without fedpi's own package metadata (a source checkout on PYTHONPATH).
    from fedpi.mnist_task import MnistTask

    return {MnistTask.name: MnistTask}


def task_class(spec: str) -> type[Task]:
    """The Task subclass named by `spec`: a registered name, or module:Class."""
    spec = spec.strip()
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            module = import_module(module_name)
        except Exception as exc:
            raise TaskError(
                f"--task {spec}: cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
            ) from exc
        cls = getattr(module, attr, None)
        if cls is None:
            raise TaskError(f"--task {spec}: module {module_name!r} has no {attr!r}")
        return _checked(spec, cls)
    entry_points = installed()
    if spec in entry_points:
        ep = entry_points[spec]
        try:
            cls = ep.load()
        except Exception as exc:
            package = f" (package {ep.dist.name} {ep.dist.version})" if ep.dist else ""
            raise TaskError(
                f"task {spec!r} = {ep.value}{package} failed to import: {type(exc).__name__}: {exc}"
            ) from exc
        return _checked(spec, cls)
    if spec in _builtin():
        return _builtin()[spec]
    known = sorted({*entry_points, *_builtin()})
    raise TaskError(
        f"unknown task {spec!r}; installed: {', '.join(known)}. Install the package that provides it, "
        f"or name the class directly: --task package.module:TaskClass"
    )


def _checked(spec: str, cls: Any) -> type[Task]:
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TaskError(f"--task {spec}: {cls!r} is not a subclass of fedpi.task.Task")
    if not cls.name:
        raise TaskError(f"--task {spec}: {cls.__name__} sets no `name`")
    return cls


def load_task(spec: str, **options: Any) -> Task:
    """An instance of the task named by `spec`, constructed with `options` (data_dir, download, and for the
    built-in task model and dataset)."""
    cls = task_class(spec)
    try:
        return cls(**options)
    except TypeError as exc:
        raise TaskError(f"task {spec!r}: cannot construct {cls.__name__}({', '.join(options)}): {exc}") from exc


def load_partition(task: Task, partition: Partition) -> tuple[Any, Any]:
    """task.load_data(partition), with a failure turned into a TaskError that names the task and the share."""
    try:
        train, test = task.load_data(partition)
    except (datasets.DatasetUnavailable, TaskError):
        raise
    except Exception as exc:
        raise TaskError(
            f"task {task.name!r}: loading the data of partition {partition.describe()} failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if len(train) == 0:
        raise TaskError(f"task {task.name!r}: partition {partition.describe()} holds no training samples")
    return train, test


def build_task(
    name: str,
    *,
    data_dir: str,
    download: bool,
    model: str | None,
    dataset: str | None,
    given_dataset: str | None = None,
):
    """The task `name`; the built-in task takes `model` and `dataset`, another one warns that it ignores them."""
    import structlog

    from fedpi.mnist_task import MnistTask
    from fedpi.models import DEFAULT_MODEL

    options = {"data_dir": data_dir, "download": download}
    if issubclass(task_class(name), MnistTask):
        options.update(model=model or DEFAULT_MODEL, dataset=dataset or "auto")
    elif model or given_dataset:
        structlog.get_logger().warning(
            "task_options_ignored",
            task=name,
            model=model,
            dataset=given_dataset,
            reason="--model and --dataset (FEDPI_MODEL, FEDPI_DATASET) choose the built-in mnist task's model and "
            "data; this task builds its own",
        )
    return load_task(name, **options)
