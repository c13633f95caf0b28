"""What a training run may tune: one typed, validated, frozen model, shared by `train`, `demo`, `serve` and the
control API.

Every field has its type, range, unit and default here and nowhere else. A field's name is its flag's (`lr` is
`--lr`, `local_batches` is `--local-batches` and FEDPI_LOCAL_BATCHES); names are unique across the groups, so a
setting can also be named without its group (`--set lr=0.1`).

Where a run's settings come from, lowest first (`merge`): the defaults below < a preset (`--preset`) < the server's
own defaults (FEDPI_* variables; `train`'s flags) < the request (a RunSpec's fields). The CLI builds its layers from
flags, the control API from the request; neither goes through the other, and nothing in this module reads a path,
a credential or a host: those are the server's alone and have no field here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from coordinator_service.policy.rules import AggregationRule, choices, parse_aggregation
from coordinator_service.policy.strategy import STRATEGIES

MAX_WORKERS = 256  # no run names more workers than this; `serve --max-workers-per-run` can lower it
MIB = 1 << 20
DAY = 86_400.0
BUDGETS = ("local_epochs", "local_batches", "local_seconds")  # one of them sets a round's local work


class SettingsError(ValueError):
    """Settings that cannot run; the message names each field, its value and what is allowed."""


class _Group(BaseModel):
    # Frozen: settings are decided once, before a run starts. No NaN or infinity anywhere: a NaN bound compares
    # false with everything, which would silently switch its check off.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, validate_default=True)


class LocalTraining(_Group):
    """Sent to every worker each round."""

    # A round's local work is one budget: epochs (the default), batches or seconds. Giving one replaces the others.
    local_epochs: int = Field(1, ge=0, le=1_000, description="passes over each worker's own data per round")
    local_batches: int = Field(0, ge=0, le=100_000, description="batches per worker per round, instead of epochs")
    local_seconds: float = Field(
        0.0,
        ge=0,
        le=DAY,
        description="seconds: instead of epochs, every worker "
        "trains for this long (mixed clusters; aggregated with FedNova unless strategy says "
        "otherwise)",
    )
    batch_size: int = Field(64, ge=1, le=65_536, description="samples per batch")
    lr: float = Field(0.05, gt=0, le=100, description="SGD learning rate of the workers")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum of the workers (fresh each round)")
    lr_schedule: Literal["auto", "cosine", "exponential", "constant"] = Field(
        "auto",
        description="the local learning rate over the run: cosine anneals it from lr to near 0 by the last round; "
        "exponential multiplies it by lr_decay each round; auto: exponential with lr_decay, else cosine",
    )
    lr_decay: float = Field(
        1.0, gt=0, le=1, description="with lr_schedule exponential: the rate of round r is lr x this^(r-1)"
    )
    proximal_mu: float = Field(
        0.0,
        ge=0,
        le=1_000,
        description="FedProx: workers add mu/2 * ||w - w_global||^2 to their loss (0: plain FedAvg)",
    )
    not_true_distillation: float = Field(
        0.5,
        ge=0,
        le=100,
        description="FedNTD's beta in round 1, annealed with the learning rate after it: a classifier's workers keep "
        "the global model's view of the classes other than each sample's own (0: off; docs/guide.md)",
    )
    seed: int = Field(
        0,
        ge=0,
        le=2**31 - 1,
        description="seeds the initial model, every worker's batch order and the choice of workers per round",
    )

    @model_validator(mode="before")
    @classmethod
    def _budget_given(cls, data: Any) -> Any:
        """local_batches or local_seconds given without local_epochs replace the default epoch."""
        if isinstance(data, dict) and "local_epochs" not in data and any(k in data for k in BUDGETS):
            return {**data, "local_epochs": 0}
        return data

    @model_validator(mode="after")
    def _one_budget(self) -> LocalTraining:
        given = [name for name in BUDGETS if getattr(self, name)]
        if len(given) != 1:
            raise ValueError(
                f"{' and '.join(given)} exclude each other: give one local budget"
                if given
                else "give one local budget: local_epochs, local_batches or local_seconds above 0"
            )
        return self

    @model_validator(mode="after")
    def _one_schedule(self) -> LocalTraining:
        if self.lr_decay != 1 and self.lr_schedule in ("cosine", "constant"):
            raise ValueError(f"lr_decay applies to lr_schedule exponential, not {self.lr_schedule}: drop one")
        return self

    @property
    def effective_lr_schedule(self) -> str:
        if self.lr_schedule == "auto":
            return "exponential" if self.lr_decay != 1 else "cosine"
        return self.lr_schedule


class Sampling(_Group):
    """Which workers train in a round, and how many must finish it."""

    fraction: float = Field(
        1.0, gt=0, le=1, description="share of the present workers that train each round (a seeded choice per round)"
    )
    workers_per_round: int = Field(
        0, ge=0, le=MAX_WORKERS, description="instead of fraction: how many workers train each round (0: off)"
    )
    min_workers: int = Field(
        0,
        ge=0,
        le=MAX_WORKERS,
        description="quorum: a round counts if this many workers finish it (0: a majority of the round's workers)",
    )

    @model_validator(mode="after")
    def _one_sample(self) -> Sampling:
        if self.workers_per_round and self.fraction < 1:
            raise ValueError("fraction and workers_per_round exclude each other: give one")
        return self


class AggregationSettings(_Group):
    """How the round's updates are combined."""

    strategy: Literal["auto", "fedavg", "fednova"] = Field(
        "auto",
        description="fedavg, or fednova (normalises updates by their local steps); auto: fednova with "
        "local_seconds, else fedavg",
    )
    aggregation: str = Field(
        "fedavg",
        max_length=32,
        description=f"{choices().replace(', ', ' | ')} (docs/guide.md, Robust aggregation)",
    )
    unweighted: bool = Field(False, description="plain mean instead of weighting by samples")
    max_update_ratio: float = Field(
        10.0,
        ge=1,
        le=1e6,
        description="refuse an update further (L2) from the global model than this many times the model's norm",
    )

    mode: Literal["sync", "async"] = Field(
        "sync",
        description="sync: rounds, every worker in step; async: buffered asynchronous versions (FedBuff), no worker "
        "waits for another (docs/guide.md, Asynchronous mode)",
    )
    buffer_size: int = Field(
        0, ge=0, le=MAX_WORKERS, description="async: updates per server step (0: half the workers, rounded up)"
    )
    max_staleness: int = Field(
        10, ge=0, le=10_000, description="async: refuse an update trained from a model this many versions old or older"
    )
    staleness_exponent: float = Field(
        0.5, ge=0, le=10, description="async: an update weighs (1 + staleness)^-this (0.5: FedBuff's 1/sqrt(1 + tau))"
    )

    @field_validator("aggregation")
    @classmethod
    def _known_rule(cls, value: str) -> str:
        return str(parse_aggregation(value))  # raises ValueError naming the rules

    @property
    def rule(self) -> AggregationRule:
        return parse_aggregation(self.aggregation)


class ServerOptimizerSettings(_Group):
    """How the aggregate becomes the next global model (docs/guide.md, Server optimizers)."""

    server_optimizer: Literal["auto", "fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "feddyn"] = Field(
        "auto",
        description="fedavg takes the aggregate; the others step towards it; feddyn also regularises every worker; "
        "auto is fedavg, or feddyn once the first round's updates disagree (docs/guide.md, Server optimizers)",
    )
    server_lr: float | None = Field(
        None,
        gt=0,
        le=100,
        description="server learning rate (default: 1.0 for fedavg and fedavgm, 0.01 for the adaptive ones)",
    )
    server_momentum: float = Field(0.9, ge=0, lt=1, description="server beta1 (fedavgm's momentum)")
    server_beta2: float = Field(0.99, ge=0, lt=1, description="second-moment decay of fedadam / fedyogi")
    server_tau: float = Field(1e-3, gt=0, le=1, description="adaptivity of fedadam / fedyogi / fedadagrad")
    feddyn_alpha: float = Field(
        0.1, gt=0, le=10, description="feddyn's alpha: the weight of each worker's dynamic regulariser"
    )

    @property
    def effective_lr(self) -> float:
        return self.server_lr or (1.0 if self.server_optimizer in ("auto", "fedavg", "fedavgm") else 0.01)


class Evaluation(_Group):
    federated_evaluation: bool = Field(
        False, description="after every round, each worker also evaluates the new model on its local test split"
    )
    sequential_evaluation: bool = Field(
        False, description="evaluate each round's model before the next round starts, not while it trains"
    )


class Transfer(_Group):
    """How weights cross the network."""

    chunk_size: int = Field(
        MIB, ge=1024, le=4 * MIB, description="bytes per weight chunk (workers accept up to 4 MiB by default)"
    )
    compression: Literal["none", "zlib", "fp16", "bf16", "int8"] = Field(
        "none",
        description="how workers send their updates: zlib (lossless, the global model too), fp16 / bf16 "
        "(half the bytes), int8 (deltas with error feedback, a quarter); docs/guide.md, Compression",
    )
    compress_global_model: bool = Field(False, description="with fp16 / bf16: send the global model that way too")

    @model_validator(mode="after")
    def _global_model_compression(self) -> Transfer:
        if self.compress_global_model and self.compression not in ("fp16", "bf16"):
            raise ValueError(
                f"compress_global_model goes with compression fp16 or bf16, not {self.compression} "
                f"(zlib always compresses the global model; int8 deltas need it exact on both sides)"
            )
        return self


class Timeouts(_Group):
    """How long the coordinator waits, and how often it tries again. All in seconds but the retry count."""

    round_timeout: float = Field(3600.0, ge=1, le=7 * DAY, description="seconds a worker may take for one round")
    idle_timeout: float = Field(
        120.0, ge=1, le=DAY, description="seconds without training progress before a worker counts as hung"
    )
    rpc_timeout: float = Field(30.0, ge=0.1, le=3600, description="seconds: deadline of short calls")
    handshake_timeout: float = Field(
        10.0,
        ge=0.1,
        le=3600,
        description="seconds an absent worker gets to answer before each round (dropped workers rejoin this way)",
    )
    round_retries: int = Field(2, ge=0, le=100, description="times a round that misses its quorum is tried again")
    retry_backoff: float = Field(
        5.0, ge=0, le=3600, description="seconds before the first retry of a round; doubles with each further retry"
    )
    keepalive: float = Field(30.0, ge=1, le=3600, description="seconds between keepalive pings on quiet connections")


class Privacy(_Group):
    """Differential privacy (docs/guide.md): worker-level DP-FedAvg with fixed or adaptive clipping (McMahan et al.
    2018, Andrew et al. 2021) on the coordinator, and DP-SGD (Abadi et al. 2016) on every worker."""

    dp_noise_multiplier: float = Field(
        0.0,
        ge=0,
        le=100,
        description="Gaussian noise of this times dp_clip_norm is added to the sum of the clipped updates (0: off)",
    )
    dp_clip_norm: float = Field(
        1.0,
        gt=0,
        le=1e6,
        description="each update is pulled back to at most this L2 distance from the global model (with "
        "dp_clip_quantile: the first round's)",
    )
    dp_clip_quantile: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="adaptive clipping (Andrew et al. 2021): the clip norm follows the share of updates to leave "
        "unclipped, e.g. 0.5 (0: a fixed dp_clip_norm)",
    )
    dp_clip_lr: float = Field(
        0.2, gt=0, le=10, description="adaptive clipping: how fast the clip norm moves (geometric steps)"
    )
    dp_clipped_count_stddev: float = Field(
        0.0,
        ge=0,
        le=1e6,
        description="adaptive clipping: the noise on the count of clipped updates, above dp_noise_multiplier / 2 "
        "(0: workers per round / 20, at least dp_noise_multiplier)",
    )
    dp_delta: float = Field(1e-5, gt=0, lt=1, description="the delta that epsilon is reported for")
    dp_target_epsilon: float = Field(
        0.0,
        ge=0,
        le=1e4,
        description="end the run before a round would take either epsilon (worker-level, or any worker's DP-SGD) past "
        "this (0: no budget)",
    )
    dp_sgd_noise_multiplier: float = Field(
        0.0,
        ge=0,
        le=100,
        description="sample-level DP on every worker (DP-SGD): noise of this times dp_sgd_max_grad_norm on each "
        "batch's sum of clipped per-sample gradients (0: off)",
    )
    dp_sgd_max_grad_norm: float = Field(
        1.0, gt=0, le=1e6, description="DP-SGD: each sample's gradient is clipped to this"
    )
    secure_aggregation: bool = Field(
        False,
        description="workers mask their updates (SecAgg+): the coordinator learns only their weighted sum "
        "(docs/guide.md, Secure aggregation)",
    )
    secagg_neighbours: int = Field(
        0,
        ge=0,
        le=10_000,
        description="secure aggregation: each worker shares its secrets with and masks against this many others, "
        "an even number (SecAgg+); 0: all others (SecAgg)",
    )
    secagg_threshold: int = Field(
        0,
        ge=0,
        le=10_000,
        description="secure aggregation: shares that rebuild a worker's secrets, a majority of its neighbours "
        "(0: the smallest majority)",
    )
    secagg_clip: float = Field(
        1.0,
        gt=0,
        le=1e4,
        description="secure aggregation: each coordinate of a worker's sample-weighted update is clipped to "
        "[-clip, clip] before it is quantised to 32 bits",
    )

    @model_validator(mode="after")
    def _even_neighbours(self) -> Privacy:
        if self.secagg_neighbours % 2:
            raise ValueError(
                f"secagg_neighbours must be even (each worker joined to as many on either side of a ring), "
                f"got {self.secagg_neighbours}; 0 joins every worker to all others"
            )
        return self

    @model_validator(mode="after")
    def _count_noise(self) -> Privacy:
        if (
            self.dp_clip_quantile
            and self.dp_clipped_count_stddev
            and not (self.dp_clipped_count_stddev > self.dp_noise_multiplier / 2)
        ):
            raise ValueError(
                f"dp_clipped_count_stddev {self.dp_clipped_count_stddev:g} must exceed half of dp_noise_multiplier "
                f"({self.dp_noise_multiplier / 2:g}): the count's noise and the sum's share the budget; 0 picks one"
            )
        return self

    @property
    def on(self) -> bool:
        return self.dp_noise_multiplier > 0

    def count_stddev(self, workers_per_round: int) -> float:
        """Adaptive clipping's noise on the count: as set, or the paper's workers / 20, at least the noise
        multiplier (which costs the sum 15% more noise) so that small fleets can use it."""
        return self.dp_clipped_count_stddev or max(workers_per_round / 20, self.dp_noise_multiplier)

    @property
    def dp_sgd(self) -> bool:
        return self.dp_sgd_noise_multiplier > 0


class RunSettings(_Group):
    """Everything a run may tune, grouped."""

    rounds: int = Field(10, ge=1, le=100_000, description="federated rounds")
    training: LocalTraining = LocalTraining()
    sampling: Sampling = Sampling()
    aggregation: AggregationSettings = AggregationSettings()
    server: ServerOptimizerSettings = ServerOptimizerSettings()
    evaluation: Evaluation = Evaluation()
    transfer: Transfer = Transfer()
    timeouts: Timeouts = Timeouts()
    privacy: Privacy = Privacy()

    @model_validator(mode="after")
    def _compatible(self) -> RunSettings:
        STRATEGIES[self.strategy_name].check_rule(self.aggregation.rule)
        if self.aggregation.mode == "async":
            self._check_async()
        if self.privacy.on:
            self._check_privacy()
        if self.privacy.dp_sgd:
            self._check_dp_sgd()
        if self.privacy.secure_aggregation:
            self._check_secure_aggregation()
        if self.server.server_optimizer == "feddyn":
            _refuse("server_optimizer feddyn", self._feddyn_conflicts())
        return self

    @property
    def server_optimizer_name(self) -> str:
        """The server optimizer the run starts with: `auto` where it may choose FedDyn, else fedavg."""
        name = self.server.server_optimizer
        if name != "auto":
            return name
        return "fedavg" if any(on for on, _ in self._feddyn_conflicts() + self._auto_conflicts()) else "auto"

    def _auto_conflicts(self) -> list[tuple[bool, str]]:
        """Where auto cannot measure how alike the updates are, or must not say it."""
        return [
            (str(self.aggregation.rule) != "fedavg", "a robust rule's result is not the mean the agreement reads"),
            (self.privacy.on, "worker-level DP: the agreement would be a release the accountant does not count"),
            (self.privacy.secure_aggregation, "secure aggregation: the coordinator sees no single update"),
        ]

    def _feddyn_conflicts(self) -> list[tuple[bool, str]]:
        """FedDyn's workers and server keep state round by round, over a step of known shape."""
        return [
            (self.aggregation.mode == "async", "mode async (its server correction spans whole rounds)"),
            (
                self.strategy_name == "fednova",
                "strategy fednova (it rescales the mean FedDyn corrects; use local_batches)",
            ),
            (bool(self.training.proximal_mu), "proximal_mu (FedDyn's regulariser has its own proximal term)"),
            (self.privacy.dp_sgd, "dp_sgd_noise_multiplier (DP-SGD steps from per-sample gradients only)"),
        ]

    def _check_secure_aggregation(self) -> None:
        """What needs to see one update: the coordinator sees only the sum."""
        a = self.aggregation
        refused = [
            (a.mode == "async", "mode async (a sum is unmasked once a round)"),
            (
                str(a.rule) != "fedavg",
                f"aggregation {a.rule} (a robust rule reads every update; the coordinator sees only their sum)",
            ),
            (self.strategy_name == "fednova", "strategy fednova (it weighs updates by their steps; use local_batches)"),
            (self.transfer.compression != "none", f"compression {self.transfer.compression} (32-bit masked integers)"),
        ]
        _refuse("secure_aggregation", refused)

    def _check_dp_sgd(self) -> None:
        t = self.training
        refused = [
            (self.aggregation.mode == "async", "mode async (the budget counts rounds)"),
            (t.local_seconds > 0, "local_seconds (the accountant needs the number of steps in advance)"),
            (t.proximal_mu > 0, "proximal_mu (its term has no per-sample gradient)"),
        ]
        _refuse("dp_sgd_noise_multiplier", refused)

    def _check_privacy(self) -> None:
        """What worker-level DP cannot go with: anything that reads or weighs individual updates its own way."""
        a = self.aggregation
        refused = [
            (a.mode == "async", "mode async (the accountant counts rounds of sampled workers)"),
            (str(a.rule) != "fedavg", f"aggregation {a.rule} (the DP mean clips every update itself)"),
            (self.strategy_name == "fednova", "strategy fednova (it weighs updates by their steps; use local_batches)"),
        ]
        _refuse("dp_noise_multiplier", refused)

    def _check_async(self) -> None:
        """What buffered asynchronous versions cannot do, each said with what to use instead."""
        a = self.aggregation
        refused = [
            (a.strategy == "fednova", "strategy fednova (its correction spans a whole round); async weighs by samples"),
            (
                str(a.rule) != "fedavg",
                f"aggregation {a.rule} (a robust rule needs every update of a round at once; async folds each "
                f"update as it arrives)",
            ),
            (
                self.sampling.fraction < 1 or bool(self.sampling.workers_per_round),
                "fraction / workers_per_round (every worker trains all the time)",
            ),
            (self.evaluation.federated_evaluation, "federated_evaluation (no round has a fixed set of workers)"),
        ]
        _refuse("mode async", refused, "; use mode sync for it")

    @property
    def strategy_name(self) -> str:
        if self.aggregation.strategy == "auto":
            return "fednova" if self.training.local_seconds and self.aggregation.mode == "sync" else "fedavg"
        return self.aggregation.strategy

    def flat(self) -> dict[str, Any]:
        """Every field by its own name: {"rounds": 10, "lr": 0.05, ...}."""
        out: dict[str, Any] = {}
        for name, value in self:
            out.update(value.model_dump() if isinstance(value, _Group) else {name: value})
        return out


def _refuse(setting: str, refused: list[tuple[bool, str]], advice: str = "") -> None:
    """ValueError naming the first of `refused` whose condition holds: what `setting` does not go with, and why."""
    for bad, what in refused:
        if bad:
            raise ValueError(f"{setting} does not go with {what}{advice}")


# -- where each field lives ----------------------------------------------------------------------------------------

GROUPS: dict[str, type[_Group]] = {
    name: info.annotation
    for name, info in RunSettings.model_fields.items()
    if isinstance(info.annotation, type) and issubclass(info.annotation, _Group)
}
#: setting -> its group (None: a field of RunSettings itself)
FIELDS: dict[str, str | None] = {
    **{name: None for name in RunSettings.model_fields if name not in GROUPS},
    **{name: group for group, model in GROUPS.items() for name in model.model_fields},
}


def field_info(name: str):
    group = FIELDS[name]
    return (RunSettings if group is None else GROUPS[group]).model_fields[name]


def default(name: str) -> Any:
    return field_info(name).default


def canonical(key: str) -> str:
    """'local-batches', '--local-batches', 'training.local_batches' -> 'local_batches'; an unknown name is refused."""
    name = key.strip().lstrip("-").replace("-", "_")
    group, dot, rest = name.partition(".")
    if dot and group in GROUPS and rest in GROUPS[group].model_fields:
        name = rest
    if name not in FIELDS:
        raise SettingsError(f"unknown setting {key!r}; run settings are: {', '.join(sorted(FIELDS))}")
    return name


# -- layers and their merge ----------------------------------------------------------------------------------------

#: Starting configurations. `default` is the fields' own defaults, chosen from `make bench-learning`
#: (docs/benchmarks.md, Learning); `seed` is fedpi's first configuration (the reference's plain SGD), kept so its
#: figures can be reproduced.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "seed": {
        "lr": 0.01,
        "momentum": 0.0,
        "local_batches": 50,
        "batch_size": 64,
        "server_optimizer": "fedavg",
        "not_true_distillation": 0.0,
        "lr_schedule": "constant",
    },
}


def merge(*layers: Mapping[str, Any]) -> RunSettings:
    """The run's settings: the defaults, then each layer in turn (flat {setting: value}; later layers win), checked
    once as a whole. Raises SettingsError naming every bad field, its value and what is allowed."""
    flat: dict[str, Any] = {}
    for layer in layers:
        flat = overlay(flat, layer)
    nested: dict[str, Any] = {}
    for name, value in flat.items():
        group = FIELDS[name]
        (nested if group is None else nested.setdefault(group, {}))[name] = value
    try:
        return RunSettings.model_validate(nested)
    except ValidationError as exc:
        raise SettingsError(describe_errors(exc, flat)) from None


def overlay(flat: Mapping[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    """`layer` over `flat`, by canonical name. The local budget counts as one setting: a layer that gives any of
    local_epochs, local_batches and local_seconds replaces all three (a flag's --local-batches wins over a preset's
    epochs, rather than clash with it)."""
    given = {canonical(k): v for k, v in layer.items()}
    kept = {k: v for k, v in flat.items() if k not in BUDGETS} if any(k in BUDGETS for k in given) else dict(flat)
    return {**kept, **given}


def describe_errors(exc: ValidationError, given: Mapping[str, Any] | None = None) -> str:
    """Pydantic's errors as one line a person can act on: 'lr = nan: Input should be a finite number; ...'."""
    parts = []
    for error in exc.errors(include_url=False):
        loc = [str(p) for p in error["loc"]]
        name = loc[-1] if loc and (len(loc) > 1 or loc[0] not in GROUPS) else ""
        message = error["msg"].removeprefix("Value error, ")
        if name and given is not None and name in given:
            parts.append(f"{name} = {_shown(given[name])}: {message}")
        elif name:
            parts.append(f"{name}: {message}")
        else:
            parts.append(message)
    return "; ".join(parts)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _EnvSettings(BaseSettings):
    """FEDPI_<SETTING> variables (a Kubernetes ConfigMap): the server's defaults for every run."""

    model_config = SettingsConfigDict(env_prefix="FEDPI_", extra="ignore", case_sensitive=False)


def _env_model() -> type[BaseSettings]:
    from pydantic import create_model

    # Every setting as an optional string: merge() checks the values with the rest, naming the variable's setting.
    fields: dict[str, Any] = {name: (str | None, None) for name in FIELDS}
    return create_model("RunSettingsEnv", __base__=_EnvSettings, **fields)


def env_layer() -> dict[str, str]:
    """The run settings set through FEDPI_* variables, as given (checked by merge)."""
    return _env_model()().model_dump(exclude_none=True)


def preset_layer(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise SettingsError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def parse_value(name: str, text: str) -> Any:
    """A setting given as text (a --set or settings-map value): booleans as true/false, the rest as pydantic parses
    it when the whole model is checked."""
    if field_info(name).annotation is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise SettingsError(f"{name} = {_shown(text)}: use true or false")
    return text.strip()


def changed(settings: RunSettings) -> dict[str, Any]:
    """The settings that differ from the defaults (for logs and records)."""
    base = RunSettings().flat()
    return {k: v for k, v in settings.flat().items() if base[k] != v}
