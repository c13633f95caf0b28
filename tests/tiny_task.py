"""Small tasks for the task API's tests: two Gaussian blobs a linear model separates, and variants of it."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedpi.task import Partition, Task


class TinyTask(Task):
    name = "tiny"
    version = "1.0"
    hidden = 8

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(2, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 2))

    def load_dataset(self) -> tuple[TensorDataset, TensorDataset]:
        gen = torch.Generator().manual_seed(0)
        y = torch.randint(0, 2, (1200,), generator=gen)
        x = torch.randn(1200, 2, generator=gen) + (y.unsqueeze(1).float() * 2 - 1) * 1.2
        return TensorDataset(x[:1000], y[:1000]), TensorDataset(x[1000:], y[1000:])


class TinyTaskPatched(TinyTask):
    """The same model, a new version: trains with 1.0."""

    version = "1.1"


class TinyTaskWide(TinyTask):
    """Version 2.0 changed the model: refused next to 1.0."""

    version = "2.0"
    hidden = 16


class NoTestData(TinyTask):
    """Data on the devices only: the coordinator has nothing to evaluate on."""

    def test_data(self):
        return None


class OtherTask(TinyTask):
    name = "other"


class BrokenOnOneWorker(TinyTask):
    """Its data cannot be read on the worker holding shard 1."""

    name = "broken"

    def load_data(self, partition: Partition):
        if partition.index == 1:
            raise OSError(f"/data/sensor-{partition.index}.csv: No such file or directory")
        return super().load_data(partition)


class ComplexBuffer(TinyTask):
    name = "complex-buffer"

    def build_model(self) -> nn.Module:
        model = super().build_model()
        model.register_buffer("phase", torch.zeros(3, dtype=torch.float8_e4m3fnuz))
        return model


class NotATask:
    name = "not-a-task"
