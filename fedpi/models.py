"""Model architectures known to both services, by the name the protocol carries."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from fedpi.names import DEFAULT_MODEL, MODEL_NAMES  # noqa: F401 - DEFAULT_MODEL re-exported


class ReferenceCNN(nn.Module):
    """The classic MNIST CNN of the PySyft websocket example: 431,080 parameters, about 1.7 MB in float32."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return F.log_softmax(self.fc2(x), dim=1)


class LargeMLP(nn.Module):
    """A wide MLP of 26.3 M parameters (105 MB in float32), for transport and memory work."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 4096)
        self.fc2 = nn.Linear(4096, 4096)
        self.fc3 = nn.Linear(4096, 1536)
        self.fc4 = nn.Linear(1536, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        x = F.relu(self.fc3(x))
        return F.log_softmax(self.fc4(x), dim=1)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "reference-cnn": ReferenceCNN,
    "large-mlp": LargeMLP,
}
assert tuple(MODELS) == MODEL_NAMES, "fedpi/names.py lists the models the command lines offer"


def build_model(name: str, seed: int = 0) -> nn.Module:
    """A fresh model with deterministic initial weights, so every process starting from `seed` agrees."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name]()


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def evaluate(model: nn.Module, split, batch_size: int = 1000) -> tuple[float, float]:
    """Mean NLL loss and accuracy of `model` on a data split."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for index in torch.arange(len(split)).split(batch_size):
        x, y = split.batch(index)
        out = model(x)
        loss_sum += F.nll_loss(out, y, reduction="sum").item()
        correct += int((out.argmax(1) == y).sum())
    return loss_sum / len(split), correct / len(split)
