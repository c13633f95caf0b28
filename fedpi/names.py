"""Names and defaults the command lines offer, without importing what implements them (torch, grpc): `--help`
answers at once. The modules that implement them import their names from here, so both always agree."""

from __future__ import annotations

DEFAULT_TASK = "mnist"
MODEL_NAMES = ("reference-cnn", "large-mlp")  # the built-in task's models (fedpi.models.MODELS)
DEFAULT_MODEL = "reference-cnn"
DATASETS = ("auto", "mnist", "fashion-mnist", "mnist-10k", "digits-5k")
PARTITION_SCHEMES = ("iid", "contiguous", "labels", "dirichlet")
DEFAULT_DIRICHLET_ALPHA = 0.5
DEFAULT_MAX_LOCAL_BATCHES = 100_000  # most batches one Train may ask for (a worker's --max-local-batches)
