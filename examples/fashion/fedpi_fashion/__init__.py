"""A fedpi task on images: torchvision's MobileNetV3-Small, untrained, classifying Fashion-MNIST's 28x28 clothes.

The data: Fashion-MNIST from --data-dir, else Debian's `dataset-fashion-mnist` package
(/usr/share/datasets/fashion-mnist), else downloaded by torchvision (fedpi.data reads all three).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision.models import mobilenet_v3_small

from fedpi import data as datasets
from fedpi.task import Task


class FashionMobileNetTask(Task):
    name = "fashion-mobilenet"
    version = "1.0"

    def build_model(self) -> nn.Module:
        model = mobilenet_v3_small(num_classes=10)  # untrained: weights=None is the default
        # Grey images: one input channel.
        stem = model.features[0][0]
        model.features[0][0] = nn.Conv2d(1, stem.out_channels, kernel_size=3, stride=2, padding=1, bias=False)
        # torchvision's MobileNetV3 updates BatchNorm statistics with momentum 0.01, tuned for long ImageNet runs:
        # after a few federated rounds of 50 batches they still describe the random initial model and evaluation
        # collapses to one class. PyTorch's usual 0.1 lets them follow the weights.
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = 0.1
        return model

    def load_dataset(self) -> tuple[Any, Any]:
        full = datasets.load_dataset("fashion-mnist", self.data_dir, download=self.download)
        return full.train, full.test  # fedpi Splits: uint8 images, normalised per batch

    @property
    def data_name(self) -> str:
        return "fashion-mnist"
