from generated.fedpi.v1 import worker_pb2 as _worker_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATE_UNSPECIFIED: _ClassVar[RunState]
    RUN_STATE_QUEUED: _ClassVar[RunState]
    RUN_STATE_TRAINING: _ClassVar[RunState]
    RUN_STATE_FINISHED: _ClassVar[RunState]
    RUN_STATE_FAILED: _ClassVar[RunState]
    RUN_STATE_STOPPED: _ClassVar[RunState]
    RUN_STATE_INTERRUPTED: _ClassVar[RunState]
RUN_STATE_UNSPECIFIED: RunState
RUN_STATE_QUEUED: RunState
RUN_STATE_TRAINING: RunState
RUN_STATE_FINISHED: RunState
RUN_STATE_FAILED: RunState
RUN_STATE_STOPPED: RunState
RUN_STATE_INTERRUPTED: RunState

class RunSpec(_message.Message):
    __slots__ = ("task", "model", "dataset", "rounds", "workers", "workers_dns", "expect_workers", "settings", "run_id", "preset", "training", "sampling", "aggregation", "server", "evaluation", "transfer", "timeouts", "privacy")
    class SettingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TASK_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_DNS_FIELD_NUMBER: _ClassVar[int]
    EXPECT_WORKERS_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    SERVER_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    TIMEOUTS_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    task: str
    model: str
    dataset: str
    rounds: int
    workers: _containers.RepeatedScalarFieldContainer[str]
    workers_dns: str
    expect_workers: int
    settings: _containers.ScalarMap[str, str]
    run_id: str
    preset: str
    training: LocalTraining
    sampling: Sampling
    aggregation: AggregationSettings
    server: ServerOptimizerSettings
    evaluation: EvaluationSettings
    transfer: TransferSettings
    timeouts: Timeouts
    privacy: PrivacySettings
    def __init__(self, task: _Optional[str] = ..., model: _Optional[str] = ..., dataset: _Optional[str] = ..., rounds: _Optional[int] = ..., workers: _Optional[_Iterable[str]] = ..., workers_dns: _Optional[str] = ..., expect_workers: _Optional[int] = ..., settings: _Optional[_Mapping[str, str]] = ..., run_id: _Optional[str] = ..., preset: _Optional[str] = ..., training: _Optional[_Union[LocalTraining, _Mapping]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., aggregation: _Optional[_Union[AggregationSettings, _Mapping]] = ..., server: _Optional[_Union[ServerOptimizerSettings, _Mapping]] = ..., evaluation: _Optional[_Union[EvaluationSettings, _Mapping]] = ..., transfer: _Optional[_Union[TransferSettings, _Mapping]] = ..., timeouts: _Optional[_Union[Timeouts, _Mapping]] = ..., privacy: _Optional[_Union[PrivacySettings, _Mapping]] = ...) -> None: ...

class LocalTraining(_message.Message):
    __slots__ = ("local_batches", "local_epochs", "local_seconds", "batch_size", "lr", "momentum", "lr_decay", "proximal_mu", "seed", "not_true_distillation", "lr_schedule")
    LOCAL_BATCHES_FIELD_NUMBER: _ClassVar[int]
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    LR_DECAY_FIELD_NUMBER: _ClassVar[int]
    PROXIMAL_MU_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NOT_TRUE_DISTILLATION_FIELD_NUMBER: _ClassVar[int]
    LR_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    local_batches: int
    local_epochs: int
    local_seconds: float
    batch_size: int
    lr: float
    momentum: float
    lr_decay: float
    proximal_mu: float
    seed: int
    not_true_distillation: float
    lr_schedule: str
    def __init__(self, local_batches: _Optional[int] = ..., local_epochs: _Optional[int] = ..., local_seconds: _Optional[float] = ..., batch_size: _Optional[int] = ..., lr: _Optional[float] = ..., momentum: _Optional[float] = ..., lr_decay: _Optional[float] = ..., proximal_mu: _Optional[float] = ..., seed: _Optional[int] = ..., not_true_distillation: _Optional[float] = ..., lr_schedule: _Optional[str] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("fraction", "workers_per_round", "min_workers")
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    WORKERS_PER_ROUND_FIELD_NUMBER: _ClassVar[int]
    MIN_WORKERS_FIELD_NUMBER: _ClassVar[int]
    fraction: float
    workers_per_round: int
    min_workers: int
    def __init__(self, fraction: _Optional[float] = ..., workers_per_round: _Optional[int] = ..., min_workers: _Optional[int] = ...) -> None: ...

class AggregationSettings(_message.Message):
    __slots__ = ("strategy", "aggregation", "unweighted", "max_update_ratio", "mode", "buffer_size", "max_staleness", "staleness_exponent")
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    UNWEIGHTED_FIELD_NUMBER: _ClassVar[int]
    MAX_UPDATE_RATIO_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    BUFFER_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    STALENESS_EXPONENT_FIELD_NUMBER: _ClassVar[int]
    strategy: str
    aggregation: str
    unweighted: bool
    max_update_ratio: float
    mode: str
    buffer_size: int
    max_staleness: int
    staleness_exponent: float
    def __init__(self, strategy: _Optional[str] = ..., aggregation: _Optional[str] = ..., unweighted: _Optional[bool] = ..., max_update_ratio: _Optional[float] = ..., mode: _Optional[str] = ..., buffer_size: _Optional[int] = ..., max_staleness: _Optional[int] = ..., staleness_exponent: _Optional[float] = ...) -> None: ...

class ServerOptimizerSettings(_message.Message):
    __slots__ = ("server_optimizer", "server_lr", "server_momentum", "server_beta2", "server_tau", "feddyn_alpha")
    SERVER_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    SERVER_LR_FIELD_NUMBER: _ClassVar[int]
    SERVER_MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    SERVER_BETA2_FIELD_NUMBER: _ClassVar[int]
    SERVER_TAU_FIELD_NUMBER: _ClassVar[int]
    FEDDYN_ALPHA_FIELD_NUMBER: _ClassVar[int]
    server_optimizer: str
    server_lr: float
    server_momentum: float
    server_beta2: float
    server_tau: float
    feddyn_alpha: float
    def __init__(self, server_optimizer: _Optional[str] = ..., server_lr: _Optional[float] = ..., server_momentum: _Optional[float] = ..., server_beta2: _Optional[float] = ..., server_tau: _Optional[float] = ..., feddyn_alpha: _Optional[float] = ...) -> None: ...

class EvaluationSettings(_message.Message):
    __slots__ = ("federated_evaluation", "sequential_evaluation")
    FEDERATED_EVALUATION_FIELD_NUMBER: _ClassVar[int]
    SEQUENTIAL_EVALUATION_FIELD_NUMBER: _ClassVar[int]
    federated_evaluation: bool
    sequential_evaluation: bool
    def __init__(self, federated_evaluation: _Optional[bool] = ..., sequential_evaluation: _Optional[bool] = ...) -> None: ...

class TransferSettings(_message.Message):
    __slots__ = ("chunk_size", "compression", "compress_global_model")
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    COMPRESS_GLOBAL_MODEL_FIELD_NUMBER: _ClassVar[int]
    chunk_size: int
    compression: str
    compress_global_model: bool
    def __init__(self, chunk_size: _Optional[int] = ..., compression: _Optional[str] = ..., compress_global_model: _Optional[bool] = ...) -> None: ...

class Timeouts(_message.Message):
    __slots__ = ("round_timeout", "idle_timeout", "rpc_timeout", "handshake_timeout", "round_retries", "retry_backoff", "keepalive")
    ROUND_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    RPC_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    HANDSHAKE_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    ROUND_RETRIES_FIELD_NUMBER: _ClassVar[int]
    RETRY_BACKOFF_FIELD_NUMBER: _ClassVar[int]
    KEEPALIVE_FIELD_NUMBER: _ClassVar[int]
    round_timeout: float
    idle_timeout: float
    rpc_timeout: float
    handshake_timeout: float
    round_retries: int
    retry_backoff: float
    keepalive: float
    def __init__(self, round_timeout: _Optional[float] = ..., idle_timeout: _Optional[float] = ..., rpc_timeout: _Optional[float] = ..., handshake_timeout: _Optional[float] = ..., round_retries: _Optional[int] = ..., retry_backoff: _Optional[float] = ..., keepalive: _Optional[float] = ...) -> None: ...

class PrivacySettings(_message.Message):
    __slots__ = ("dp_noise_multiplier", "dp_clip_norm", "dp_delta", "dp_target_epsilon", "dp_sgd_noise_multiplier", "dp_sgd_max_grad_norm", "secure_aggregation", "secagg_neighbours", "secagg_threshold", "secagg_clip", "dp_clip_quantile", "dp_clip_lr", "dp_clipped_count_stddev")
    DP_NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    DP_CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    DP_DELTA_FIELD_NUMBER: _ClassVar[int]
    DP_TARGET_EPSILON_FIELD_NUMBER: _ClassVar[int]
    DP_SGD_NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    DP_SGD_MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    SECURE_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    SECAGG_NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    SECAGG_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SECAGG_CLIP_FIELD_NUMBER: _ClassVar[int]
    DP_CLIP_QUANTILE_FIELD_NUMBER: _ClassVar[int]
    DP_CLIP_LR_FIELD_NUMBER: _ClassVar[int]
    DP_CLIPPED_COUNT_STDDEV_FIELD_NUMBER: _ClassVar[int]
    dp_noise_multiplier: float
    dp_clip_norm: float
    dp_delta: float
    dp_target_epsilon: float
    dp_sgd_noise_multiplier: float
    dp_sgd_max_grad_norm: float
    secure_aggregation: bool
    secagg_neighbours: int
    secagg_threshold: int
    secagg_clip: float
    dp_clip_quantile: float
    dp_clip_lr: float
    dp_clipped_count_stddev: float
    def __init__(self, dp_noise_multiplier: _Optional[float] = ..., dp_clip_norm: _Optional[float] = ..., dp_delta: _Optional[float] = ..., dp_target_epsilon: _Optional[float] = ..., dp_sgd_noise_multiplier: _Optional[float] = ..., dp_sgd_max_grad_norm: _Optional[float] = ..., secure_aggregation: _Optional[bool] = ..., secagg_neighbours: _Optional[int] = ..., secagg_threshold: _Optional[int] = ..., secagg_clip: _Optional[float] = ..., dp_clip_quantile: _Optional[float] = ..., dp_clip_lr: _Optional[float] = ..., dp_clipped_count_stddev: _Optional[float] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("name", "state", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: str
    reason: str
    def __init__(self, name: _Optional[str] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Failure(_message.Message):
    __slots__ = ("round", "worker", "phase", "reason")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    round: int
    worker: str
    phase: str
    reason: str
    def __init__(self, round: _Optional[int] = ..., worker: _Optional[str] = ..., phase: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Run(_message.Message):
    __slots__ = ("run_id", "state", "spec", "round", "rounds", "test_accuracy", "test_loss", "last_round_json", "workers", "failures", "error", "started_at", "ended_at", "resumable", "settings_json")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TEST_LOSS_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_JSON_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    RESUMABLE_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_JSON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    state: RunState
    spec: RunSpec
    round: int
    rounds: int
    test_accuracy: float
    test_loss: float
    last_round_json: str
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    failures: _containers.RepeatedCompositeFieldContainer[Failure]
    error: str
    started_at: float
    ended_at: float
    resumable: bool
    settings_json: str
    def __init__(self, run_id: _Optional[str] = ..., state: _Optional[_Union[RunState, str]] = ..., spec: _Optional[_Union[RunSpec, _Mapping]] = ..., round: _Optional[int] = ..., rounds: _Optional[int] = ..., test_accuracy: _Optional[float] = ..., test_loss: _Optional[float] = ..., last_round_json: _Optional[str] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., failures: _Optional[_Iterable[_Union[Failure, _Mapping]]] = ..., error: _Optional[str] = ..., started_at: _Optional[float] = ..., ended_at: _Optional[float] = ..., resumable: _Optional[bool] = ..., settings_json: _Optional[str] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class Runs(_message.Message):
    __slots__ = ("runs", "next_page_token", "warning")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WARNING_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[Run]
    next_page_token: str
    warning: str
    def __init__(self, runs: _Optional[_Iterable[_Union[Run, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., warning: _Optional[str] = ...) -> None: ...

class WatchRunRequest(_message.Message):
    __slots__ = ("run_id", "from_start")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_START_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    from_start: bool
    def __init__(self, run_id: _Optional[str] = ..., from_start: _Optional[bool] = ...) -> None: ...

class RunEvent(_message.Message):
    __slots__ = ("run_id", "sequence", "event", "json")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    sequence: int
    event: str
    json: str
    def __init__(self, run_id: _Optional[str] = ..., sequence: _Optional[int] = ..., event: _Optional[str] = ..., json: _Optional[str] = ...) -> None: ...

class StopRunRequest(_message.Message):
    __slots__ = ("run_id", "abandon_round")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ABANDON_ROUND_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    abandon_round: bool
    def __init__(self, run_id: _Optional[str] = ..., abandon_round: _Optional[bool] = ...) -> None: ...

class ResumeRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("run_id", "round", "chunk_size")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    chunk_size: int
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., chunk_size: _Optional[int] = ...) -> None: ...
