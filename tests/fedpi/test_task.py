"""The task API on its own: partitions, batches, finding tasks, checks on models and data, the built-in task."""

from __future__ import annotations

from importlib import metadata

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import Subset, TensorDataset

from fedpi import data as datasets
from fedpi import task as tasks
from fedpi.mnist_task import MnistTask
from fedpi.task import Partition, TaskError, batch_of, fingerprint, initial_model, load_partition, task_class
from fedpi.weights import serde
from tests.tiny_task import BrokenOnOneWorker, ComplexBuffer, TinyTask, TinyTaskPatched, TinyTaskWide


class Pairs:
    """A plain map-style dataset: no tensors attribute, no targets."""

    def __init__(self, labels):
        self.labels_ = list(labels)

    def __len__(self):
        return len(self.labels_)

    def __getitem__(self, i):
        return torch.tensor([float(i)]), self.labels_[i]


def test_partition_cuts_a_tensor_dataset_into_disjoint_shards_of_the_same_kind():
    x, y = torch.arange(90.0).unsqueeze(1), torch.arange(90) % 3
    shards = [Partition(i, 3, "labels").apply(TensorDataset(x, y)) for i in range(3)]
    assert all(isinstance(s, TensorDataset) for s in shards)
    # labels: shard i holds class i alone, and together they hold every sample once
    assert [set(s.tensors[1].tolist()) for s in shards] == [{0}, {1}, {2}]
    assert sorted(torch.cat([s.tensors[0] for s in shards]).squeeze(1).tolist()) == x.squeeze(1).tolist()


def test_partition_of_a_plain_dataset_reads_its_labels_and_gives_a_subset():
    data = Pairs([0, 1] * 20)
    shard = Partition(1, 2, "labels").apply(data)
    assert isinstance(shard, Subset) and {shard[i][1] for i in range(len(shard))} == {1}
    iid = [Partition(i, 2, "iid", seed=3).indices(data) for i in range(2)]
    assert sorted(np.concatenate(iid).tolist()) == list(range(40))
    assert Partition.whole().apply(data) is data


def test_batches_of_each_kind_of_split():
    x, y = torch.randn(10, 2), torch.arange(10)
    index = torch.tensor([3, 7])
    bx, by = batch_of(TensorDataset(x, y), index)
    assert torch.equal(bx, x[index]) and torch.equal(by, y[index])
    px, py = batch_of(Pairs(range(10)), index)
    assert px.tolist() == [[3.0], [7.0]] and py.tolist() == [3, 7]


def test_default_training_step_and_evaluation_are_cross_entropy_and_argmax_accuracy():
    task = TinyTask()
    model = initial_model(task, seed=1)
    train, test = task.load_dataset()
    x, y = test.tensors
    step = task.train_step(model, (x, y))
    with torch.no_grad():
        out = model(x)
    assert step.loss.item() == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-6)
    assert step.correct == int((out.argmax(1) == y).sum()) and step.samples == 200
    loss, accuracy = task.evaluate(model, test, batch_size=64)  # uneven batches: the mean is still per sample
    assert loss == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-5)
    assert accuracy == step.correct / 200


def test_initial_model_is_seeded_and_fingerprint_follows_the_manifest():
    a, b = initial_model(TinyTask(), seed=4), initial_model(TinyTask(), seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a[0].weight, initial_model(TinyTask(), seed=5)[0].weight)
    print_ = lambda m: fingerprint(serde.manifest_of(m.state_dict()))  # noqa: E731
    assert print_(a) == print_(initial_model(TinyTaskPatched()))
    assert print_(a) != print_(initial_model(TinyTaskWide()))
    assert len(print_(a)) == 16


def test_a_model_the_wire_cannot_carry_is_refused_naming_the_tensor():
    with pytest.raises(TaskError, match=r"'phase' has dtype float8_e4m3fnuz, which fedpi's wire format cannot carry"):
        initial_model(ComplexBuffer())


def test_failing_data_is_reported_with_the_task_and_the_share():
    task = BrokenOnOneWorker()
    train, _ = load_partition(task, Partition(0, 3))
    assert len(train) > 0
    with pytest.raises(TaskError) as exc:
        load_partition(task, Partition(1, 3))
    assert "task 'broken'" in str(exc.value) and "partition 1/3 iid seed=0" in str(exc.value)
    assert "OSError: /data/sensor-1.csv: No such file or directory" in str(exc.value)


def test_tasks_are_found_by_name_or_by_module_and_class():
    assert task_class("mnist") is MnistTask
    assert task_class("tests.tiny_task:TinyTask") is TinyTask
    assert "mnist" in tasks.installed()  # fedpi registers its own task like any package would


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_package.tasks:Sensor", "cannot import module 'no_such_package.tasks': ModuleNotFoundError"),
        ("tests.tiny_task:Missing", "module 'tests.tiny_task' has no 'Missing'"),
        ("tests.tiny_task:NotATask", "is not a subclass of fedpi.task.Task"),
        ("sensor", "unknown task 'sensor'; installed: "),
    ],
)
def test_tasks_that_cannot_be_found_say_why(spec, message):
    with pytest.raises(TaskError, match=message.replace("(", r"\(").replace(".", r"\.")):
        task_class(spec)


def test_a_registered_task_that_fails_to_import_names_its_package(monkeypatch):
    broken = metadata.EntryPoint("sensor", "no_such_package.tasks:Sensor", tasks.ENTRY_POINT_GROUP)
    monkeypatch.setattr(tasks, "installed", lambda: {"sensor": broken})
    with pytest.raises(
        TaskError, match="task 'sensor' = no_such_package.tasks:Sensor .*failed to import: ModuleNotFoundError"
    ):
        task_class("sensor")


def test_the_built_in_task_cuts_the_data_as_fedpi_always_has():
    task = MnistTask(dataset="digits-5k", download=False)
    train, test = task.load_data(Partition(1, 3, "dirichlet", seed=2, alpha=0.3))
    expected = datasets.shard(datasets.load_dataset("digits-5k", "unused", download=False), 1, 3, "dirichlet", 2, 0.3)
    assert torch.equal(train.labels, expected.train.labels) and torch.equal(test.images, expected.test.images)
    assert task.data_name == "digits-5k" and task.architecture == "reference-cnn"
    assert len(task.test_data()) == 1000
