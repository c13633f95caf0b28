"""A fedpi task on tabular data: the Wisconsin breast-cancer set that ships inside scikit-learn (569 tumours, 30
measurements each, benign or malignant), classified by a small MLP. Every worker keeps its share of the rows."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedpi.task import Task

TEST_ROWS = 114  # 20% held out, the same rows on every machine


class BreastCancerTask(Task):
    name = "breast-cancer"
    version = "1.0"
    hidden = 32

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(30, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 2))

    def load_dataset(self) -> tuple[TensorDataset, TensorDataset]:
        from sklearn.datasets import load_breast_cancer  # ships with scikit-learn: no download

        x, y = load_breast_cancer(return_X_y=True)
        order = np.random.default_rng(0).permutation(len(y))  # fixed: every worker cuts the same rows
        x, y = x[order], y[order]
        train_x, test_x = x[:-TEST_ROWS], x[-TEST_ROWS:]
        # The features span five orders of magnitude: standardise with the training rows' statistics, which are
        # constants of this dataset (a task on live data would ship its own).
        mean, std = train_x.mean(0), train_x.std(0)

        def split(features: np.ndarray, labels: np.ndarray) -> TensorDataset:
            scaled = (features - mean) / std
            return TensorDataset(torch.tensor(scaled, dtype=torch.float32), torch.tensor(labels, dtype=torch.int64))

        return split(train_x, y[:-TEST_ROWS]), split(test_x, y[-TEST_ROWS:])
