"""Why a weight stream or state_dict is refused. Plain exceptions: each service maps them to its own status codes
at its edge (worker_service.servicer)."""

from __future__ import annotations


class WeightsError(Exception):
    """A weight stream or state_dict that cannot be accepted."""


class MalformedStream(WeightsError):
    """The stream breaks the protocol: missing or repeated header, chunk out of order, bad sizes."""


class ManifestMismatch(WeightsError):
    """The tensors announced do not match the model they are meant for (names, dtypes or shapes)."""


class ArchitectureMismatch(WeightsError):
    """The weights belong to another model architecture."""


class DigestMismatch(WeightsError):
    """The bytes received do not hash to the digest announced: corrupted in transit."""


class PayloadTooLarge(WeightsError):
    """A chunk or the whole payload is larger than this side accepts."""


class NonFiniteWeights(WeightsError):
    """A floating-point tensor holds NaN or Inf."""


class UploadTimedOut(WeightsError):
    """A weight upload did not arrive within the time its size allows."""


class UnsupportedDtype(WeightsError):
    """A tensor dtype that has no portable byte layout here."""
