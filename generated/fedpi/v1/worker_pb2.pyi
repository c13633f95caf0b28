from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_STATE_UNSPECIFIED: _ClassVar[WorkerState]
    WORKER_STATE_IDLE: _ClassVar[WorkerState]
    WORKER_STATE_TRAINING: _ClassVar[WorkerState]

class ChunkEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHUNK_ENCODING_UNSPECIFIED: _ClassVar[ChunkEncoding]
    CHUNK_ENCODING_RAW: _ClassVar[ChunkEncoding]
    CHUNK_ENCODING_ZLIB: _ClassVar[ChunkEncoding]
    CHUNK_ENCODING_FP16: _ClassVar[ChunkEncoding]
    CHUNK_ENCODING_BF16: _ClassVar[ChunkEncoding]
    CHUNK_ENCODING_INT8_DELTA: _ClassVar[ChunkEncoding]
WORKER_STATE_UNSPECIFIED: WorkerState
WORKER_STATE_IDLE: WorkerState
WORKER_STATE_TRAINING: WorkerState
CHUNK_ENCODING_UNSPECIFIED: ChunkEncoding
CHUNK_ENCODING_RAW: ChunkEncoding
CHUNK_ENCODING_ZLIB: ChunkEncoding
CHUNK_ENCODING_FP16: ChunkEncoding
CHUNK_ENCODING_BF16: ChunkEncoding
CHUNK_ENCODING_INT8_DELTA: ChunkEncoding

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "protocol_version", "software_version", "model_architecture", "parameter_count", "train_samples", "test_samples", "dataset", "partition", "chunk_encodings", "state", "torch_version", "cpu_architecture", "weights_round", "max_payload_bytes", "max_chunk_bytes", "weights_round_id", "weights_trained", "max_local_batches", "task", "task_version", "manifest_fingerprint", "digests", "warning", "health")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TEST_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    CPU_ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_ROUND_FIELD_NUMBER: _ClassVar[int]
    MAX_PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_TRAINED_FIELD_NUMBER: _ClassVar[int]
    MAX_LOCAL_BATCHES_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    TASK_VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    WARNING_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    protocol_version: str
    software_version: str
    model_architecture: str
    parameter_count: int
    train_samples: int
    test_samples: int
    dataset: str
    partition: str
    chunk_encodings: _containers.RepeatedScalarFieldContainer[ChunkEncoding]
    state: WorkerState
    torch_version: str
    cpu_architecture: str
    weights_round: int
    max_payload_bytes: int
    max_chunk_bytes: int
    weights_round_id: str
    weights_trained: bool
    max_local_batches: int
    task: str
    task_version: str
    manifest_fingerprint: str
    digests: _containers.RepeatedScalarFieldContainer[str]
    warning: str
    health: BoardHealth
    def __init__(self, worker_id: _Optional[str] = ..., protocol_version: _Optional[str] = ..., software_version: _Optional[str] = ..., model_architecture: _Optional[str] = ..., parameter_count: _Optional[int] = ..., train_samples: _Optional[int] = ..., test_samples: _Optional[int] = ..., dataset: _Optional[str] = ..., partition: _Optional[str] = ..., chunk_encodings: _Optional[_Iterable[_Union[ChunkEncoding, str]]] = ..., state: _Optional[_Union[WorkerState, str]] = ..., torch_version: _Optional[str] = ..., cpu_architecture: _Optional[str] = ..., weights_round: _Optional[int] = ..., max_payload_bytes: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ..., weights_round_id: _Optional[str] = ..., weights_trained: _Optional[bool] = ..., max_local_batches: _Optional[int] = ..., task: _Optional[str] = ..., task_version: _Optional[str] = ..., manifest_fingerprint: _Optional[str] = ..., digests: _Optional[_Iterable[str]] = ..., warning: _Optional[str] = ..., health: _Optional[_Union[BoardHealth, _Mapping]] = ...) -> None: ...

class BoardHealth(_message.Message):
    __slots__ = ("cpu_temperature_celsius", "under_voltage", "frequency_capped", "throttled", "soft_temperature_limit", "under_voltage_since_boot", "frequency_capped_since_boot", "throttled_since_boot", "soft_temperature_limit_since_boot", "memory_available_bytes", "samples_per_second")
    CPU_TEMPERATURE_CELSIUS_FIELD_NUMBER: _ClassVar[int]
    UNDER_VOLTAGE_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_CAPPED_FIELD_NUMBER: _ClassVar[int]
    THROTTLED_FIELD_NUMBER: _ClassVar[int]
    SOFT_TEMPERATURE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    UNDER_VOLTAGE_SINCE_BOOT_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_CAPPED_SINCE_BOOT_FIELD_NUMBER: _ClassVar[int]
    THROTTLED_SINCE_BOOT_FIELD_NUMBER: _ClassVar[int]
    SOFT_TEMPERATURE_LIMIT_SINCE_BOOT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    cpu_temperature_celsius: float
    under_voltage: bool
    frequency_capped: bool
    throttled: bool
    soft_temperature_limit: bool
    under_voltage_since_boot: bool
    frequency_capped_since_boot: bool
    throttled_since_boot: bool
    soft_temperature_limit_since_boot: bool
    memory_available_bytes: int
    samples_per_second: float
    def __init__(self, cpu_temperature_celsius: _Optional[float] = ..., under_voltage: _Optional[bool] = ..., frequency_capped: _Optional[bool] = ..., throttled: _Optional[bool] = ..., soft_temperature_limit: _Optional[bool] = ..., under_voltage_since_boot: _Optional[bool] = ..., frequency_capped_since_boot: _Optional[bool] = ..., throttled_since_boot: _Optional[bool] = ..., soft_temperature_limit_since_boot: _Optional[bool] = ..., memory_available_bytes: _Optional[int] = ..., samples_per_second: _Optional[float] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "byte_length")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    BYTE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    byte_length: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., byte_length: _Optional[int] = ...) -> None: ...

class WeightsHeader(_message.Message):
    __slots__ = ("round", "model_architecture", "tensors", "total_bytes", "digest", "encoding", "round_id", "trained")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    TRAINED_FIELD_NUMBER: _ClassVar[int]
    round: int
    model_architecture: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    total_bytes: int
    digest: str
    encoding: ChunkEncoding
    round_id: str
    trained: bool
    def __init__(self, round: _Optional[int] = ..., model_architecture: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., digest: _Optional[str] = ..., encoding: _Optional[_Union[ChunkEncoding, str]] = ..., round_id: _Optional[str] = ..., trained: _Optional[bool] = ...) -> None: ...

class WeightsData(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class WeightsTrailer(_message.Message):
    __slots__ = ("digest",)
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: str
    def __init__(self, digest: _Optional[str] = ...) -> None: ...

class WeightsChunk(_message.Message):
    __slots__ = ("header", "data", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: WeightsHeader
    data: WeightsData
    trailer: WeightsTrailer
    def __init__(self, header: _Optional[_Union[WeightsHeader, _Mapping]] = ..., data: _Optional[_Union[WeightsData, _Mapping]] = ..., trailer: _Optional[_Union[WeightsTrailer, _Mapping]] = ...) -> None: ...

class SetWeightsResponse(_message.Message):
    __slots__ = ("round", "bytes_received", "seconds")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    round: int
    bytes_received: int
    seconds: float
    def __init__(self, round: _Optional[int] = ..., bytes_received: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("round", "local_batches", "local_epochs", "batch_size", "learning_rate", "momentum", "seed", "evaluate", "round_id", "proximal_mu", "local_seconds", "update_encoding", "not_true_distillation", "dp_sgd_noise_multiplier", "dp_sgd_max_grad_norm", "dp_delta", "secure_aggregation", "feddyn_alpha")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LOCAL_BATCHES_FIELD_NUMBER: _ClassVar[int]
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    PROXIMAL_MU_FIELD_NUMBER: _ClassVar[int]
    LOCAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_ENCODING_FIELD_NUMBER: _ClassVar[int]
    NOT_TRUE_DISTILLATION_FIELD_NUMBER: _ClassVar[int]
    DP_SGD_NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    DP_SGD_MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    DP_DELTA_FIELD_NUMBER: _ClassVar[int]
    SECURE_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    FEDDYN_ALPHA_FIELD_NUMBER: _ClassVar[int]
    round: int
    local_batches: int
    local_epochs: int
    batch_size: int
    learning_rate: float
    momentum: float
    seed: int
    evaluate: bool
    round_id: str
    proximal_mu: float
    local_seconds: float
    update_encoding: ChunkEncoding
    not_true_distillation: float
    dp_sgd_noise_multiplier: float
    dp_sgd_max_grad_norm: float
    dp_delta: float
    secure_aggregation: bool
    feddyn_alpha: float
    def __init__(self, round: _Optional[int] = ..., local_batches: _Optional[int] = ..., local_epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., momentum: _Optional[float] = ..., seed: _Optional[int] = ..., evaluate: _Optional[bool] = ..., round_id: _Optional[str] = ..., proximal_mu: _Optional[float] = ..., local_seconds: _Optional[float] = ..., update_encoding: _Optional[_Union[ChunkEncoding, str]] = ..., not_true_distillation: _Optional[float] = ..., dp_sgd_noise_multiplier: _Optional[float] = ..., dp_sgd_max_grad_norm: _Optional[float] = ..., dp_delta: _Optional[float] = ..., secure_aggregation: _Optional[bool] = ..., feddyn_alpha: _Optional[float] = ...) -> None: ...

class TrainProgress(_message.Message):
    __slots__ = ("batches_done", "batches_total", "mean_loss", "seconds", "heartbeat", "health")
    BATCHES_DONE_FIELD_NUMBER: _ClassVar[int]
    BATCHES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MEAN_LOSS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    batches_done: int
    batches_total: int
    mean_loss: float
    seconds: float
    heartbeat: bool
    health: BoardHealth
    def __init__(self, batches_done: _Optional[int] = ..., batches_total: _Optional[int] = ..., mean_loss: _Optional[float] = ..., seconds: _Optional[float] = ..., heartbeat: _Optional[bool] = ..., health: _Optional[_Union[BoardHealth, _Mapping]] = ...) -> None: ...

class TrainResult(_message.Message):
    __slots__ = ("round", "samples", "batches", "mean_loss", "accuracy", "train_seconds", "test_loss", "test_accuracy", "test_samples", "round_id", "dp_epsilon")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    MEAN_LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TEST_LOSS_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TEST_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    DP_EPSILON_FIELD_NUMBER: _ClassVar[int]
    round: int
    samples: int
    batches: int
    mean_loss: float
    accuracy: float
    train_seconds: float
    test_loss: float
    test_accuracy: float
    test_samples: int
    round_id: str
    dp_epsilon: float
    def __init__(self, round: _Optional[int] = ..., samples: _Optional[int] = ..., batches: _Optional[int] = ..., mean_loss: _Optional[float] = ..., accuracy: _Optional[float] = ..., train_seconds: _Optional[float] = ..., test_loss: _Optional[float] = ..., test_accuracy: _Optional[float] = ..., test_samples: _Optional[int] = ..., round_id: _Optional[str] = ..., dp_epsilon: _Optional[float] = ...) -> None: ...

class TrainUpdate(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: TrainProgress
    result: TrainResult
    def __init__(self, progress: _Optional[_Union[TrainProgress, _Mapping]] = ..., result: _Optional[_Union[TrainResult, _Mapping]] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("round_id",)
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    def __init__(self, round_id: _Optional[str] = ...) -> None: ...

class EvaluateResult(_message.Message):
    __slots__ = ("round", "round_id", "loss", "accuracy", "samples", "seconds")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    round: int
    round_id: str
    loss: float
    accuracy: float
    samples: int
    seconds: float
    def __init__(self, round: _Optional[int] = ..., round_id: _Optional[str] = ..., loss: _Optional[float] = ..., accuracy: _Optional[float] = ..., samples: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class GetWeightsRequest(_message.Message):
    __slots__ = ("chunk_size", "encoding", "digest_in_trailer", "digests")
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    DIGEST_IN_TRAILER_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    chunk_size: int
    encoding: ChunkEncoding
    digest_in_trailer: bool
    digests: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, chunk_size: _Optional[int] = ..., encoding: _Optional[_Union[ChunkEncoding, str]] = ..., digest_in_trailer: _Optional[bool] = ..., digests: _Optional[_Iterable[str]] = ...) -> None: ...

class SecAggConfig(_message.Message):
    __slots__ = ("round_id", "index", "neighbours", "threshold", "clip", "workers", "max_weight", "unweighted", "dp_clip_norm", "dp_noise_multiplier", "dp_survivors", "coordinates", "dp_count_stddev")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    MAX_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    UNWEIGHTED_FIELD_NUMBER: _ClassVar[int]
    DP_CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    DP_NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    DP_SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    COORDINATES_FIELD_NUMBER: _ClassVar[int]
    DP_COUNT_STDDEV_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    index: int
    neighbours: _containers.RepeatedScalarFieldContainer[int]
    threshold: int
    clip: float
    workers: int
    max_weight: int
    unweighted: bool
    dp_clip_norm: float
    dp_noise_multiplier: float
    dp_survivors: int
    coordinates: int
    dp_count_stddev: float
    def __init__(self, round_id: _Optional[str] = ..., index: _Optional[int] = ..., neighbours: _Optional[_Iterable[int]] = ..., threshold: _Optional[int] = ..., clip: _Optional[float] = ..., workers: _Optional[int] = ..., max_weight: _Optional[int] = ..., unweighted: _Optional[bool] = ..., dp_clip_norm: _Optional[float] = ..., dp_noise_multiplier: _Optional[float] = ..., dp_survivors: _Optional[int] = ..., coordinates: _Optional[int] = ..., dp_count_stddev: _Optional[float] = ...) -> None: ...

class SecAggKeysRequest(_message.Message):
    __slots__ = ("config",)
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    config: SecAggConfig
    def __init__(self, config: _Optional[_Union[SecAggConfig, _Mapping]] = ...) -> None: ...

class SecAggKeysResponse(_message.Message):
    __slots__ = ("round_id", "cipher_public_key", "mask_public_key")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    CIPHER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    cipher_public_key: bytes
    mask_public_key: bytes
    def __init__(self, round_id: _Optional[str] = ..., cipher_public_key: _Optional[bytes] = ..., mask_public_key: _Optional[bytes] = ...) -> None: ...

class PeerKeys(_message.Message):
    __slots__ = ("index", "cipher_public_key", "mask_public_key")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CIPHER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    index: int
    cipher_public_key: bytes
    mask_public_key: bytes
    def __init__(self, index: _Optional[int] = ..., cipher_public_key: _Optional[bytes] = ..., mask_public_key: _Optional[bytes] = ...) -> None: ...

class SecAggSharesRequest(_message.Message):
    __slots__ = ("round_id", "peers")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    peers: _containers.RepeatedCompositeFieldContainer[PeerKeys]
    def __init__(self, round_id: _Optional[str] = ..., peers: _Optional[_Iterable[_Union[PeerKeys, _Mapping]]] = ...) -> None: ...

class SealedShare(_message.Message):
    __slots__ = ("sender", "receiver", "nonce", "ciphertext")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    sender: int
    receiver: int
    nonce: bytes
    ciphertext: bytes
    def __init__(self, sender: _Optional[int] = ..., receiver: _Optional[int] = ..., nonce: _Optional[bytes] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class SecAggSharesResponse(_message.Message):
    __slots__ = ("round_id", "shares", "self_mask_commitment")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    SELF_MASK_COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    shares: _containers.RepeatedCompositeFieldContainer[SealedShare]
    self_mask_commitment: bytes
    def __init__(self, round_id: _Optional[str] = ..., shares: _Optional[_Iterable[_Union[SealedShare, _Mapping]]] = ..., self_mask_commitment: _Optional[bytes] = ...) -> None: ...

class GetMaskedUpdateRequest(_message.Message):
    __slots__ = ("round_id", "peers", "chunk_size")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    peers: _containers.RepeatedScalarFieldContainer[int]
    chunk_size: int
    def __init__(self, round_id: _Optional[str] = ..., peers: _Optional[_Iterable[int]] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class MaskedUpdateHeader(_message.Message):
    __slots__ = ("round_id", "elements")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    elements: int
    def __init__(self, round_id: _Optional[str] = ..., elements: _Optional[int] = ...) -> None: ...

class MaskedUpdateTrailer(_message.Message):
    __slots__ = ("clipped",)
    CLIPPED_FIELD_NUMBER: _ClassVar[int]
    clipped: int
    def __init__(self, clipped: _Optional[int] = ...) -> None: ...

class MaskedChunk(_message.Message):
    __slots__ = ("header", "data", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: MaskedUpdateHeader
    data: WeightsData
    trailer: MaskedUpdateTrailer
    def __init__(self, header: _Optional[_Union[MaskedUpdateHeader, _Mapping]] = ..., data: _Optional[_Union[WeightsData, _Mapping]] = ..., trailer: _Optional[_Union[MaskedUpdateTrailer, _Mapping]] = ...) -> None: ...

class SecAggUnmaskRequest(_message.Message):
    __slots__ = ("round_id", "survivors", "dropped", "shares")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    survivors: _containers.RepeatedScalarFieldContainer[int]
    dropped: _containers.RepeatedScalarFieldContainer[int]
    shares: _containers.RepeatedCompositeFieldContainer[SealedShare]
    def __init__(self, round_id: _Optional[str] = ..., survivors: _Optional[_Iterable[int]] = ..., dropped: _Optional[_Iterable[int]] = ..., shares: _Optional[_Iterable[_Union[SealedShare, _Mapping]]] = ...) -> None: ...

class RevealedShare(_message.Message):
    __slots__ = ("owner", "share")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    owner: int
    share: bytes
    def __init__(self, owner: _Optional[int] = ..., share: _Optional[bytes] = ...) -> None: ...

class SecAggUnmaskResponse(_message.Message):
    __slots__ = ("round_id", "self_mask_shares", "mask_key_shares")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    SELF_MASK_SHARES_FIELD_NUMBER: _ClassVar[int]
    MASK_KEY_SHARES_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    self_mask_shares: _containers.RepeatedCompositeFieldContainer[RevealedShare]
    mask_key_shares: _containers.RepeatedCompositeFieldContainer[RevealedShare]
    def __init__(self, round_id: _Optional[str] = ..., self_mask_shares: _Optional[_Iterable[_Union[RevealedShare, _Mapping]]] = ..., mask_key_shares: _Optional[_Iterable[_Union[RevealedShare, _Mapping]]] = ...) -> None: ...
