"""Tensors <-> chunked weight streams: a header with the tensor manifest and a digest, then raw bytes in chunks.

Never pickle: the payload is the little-endian bytes of each tensor, in manifest order, so any fedpi release can
read any other's weights and a bad stream is caught by plain checks, not by a deserialiser crash. Both services use
it: the worker to install and send weights, the coordinator to send and to fold weights into the aggregate. This
module gathers the parts: `errors`, `manifest`, `digests`, `send`, `receive`.
"""

from fedpi.weights.digests import (
    DIGEST_PREFIX,
    DIGESTS,
    DIGESTS_BEFORE_1_6,
    digest_of,
    digests_by_speed,
    fastest_digest,
)
from fedpi.weights.errors import (
    ArchitectureMismatch,
    DigestMismatch,
    MalformedStream,
    ManifestMismatch,
    NonFiniteWeights,
    PayloadTooLarge,
    UnsupportedDtype,
    UploadTimedOut,
    WeightsError,
)
from fedpi.weights.manifest import (
    TensorMeta,
    all_finite,
    check_finite,
    dtype_name,
    manifest_of,
    supported_dtypes,
    tensors_from_buffer,
)
from fedpi.weights.receive import (
    DEFAULT_MAX_CHUNK_BYTES,
    DEFAULT_MAX_PAYLOAD_BYTES,
    MODEL_ENCODINGS,
    SUPPORTED_ENCODINGS,
    Assembler,
    StreamReader,
    is_header,
    read_state_dict,
    state_dict_from_payload,
)
from fedpi.weights.send import DEFAULT_CHUNK_BYTES, Broadcast, OutgoingStream, WeightsPayload, piece_sizes

__all__ = [
    "DEFAULT_CHUNK_BYTES", "DEFAULT_MAX_CHUNK_BYTES", "DEFAULT_MAX_PAYLOAD_BYTES", "DIGESTS", "DIGESTS_BEFORE_1_6",
    "DIGEST_PREFIX", "MODEL_ENCODINGS", "SUPPORTED_ENCODINGS", "ArchitectureMismatch", "Assembler", "Broadcast",
    "DigestMismatch", "MalformedStream", "ManifestMismatch", "NonFiniteWeights", "OutgoingStream", "PayloadTooLarge",
    "StreamReader", "TensorMeta", "UnsupportedDtype", "UploadTimedOut", "WeightsError", "WeightsPayload", "all_finite",
    "check_finite", "digest_of", "digests_by_speed", "dtype_name", "fastest_digest", "is_header", "manifest_of",
    "piece_sizes", "read_state_dict", "state_dict_from_payload", "supported_dtypes", "tensors_from_buffer",
]  # fmt: skip
