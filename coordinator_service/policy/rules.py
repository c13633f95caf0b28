"""Aggregation rules: how one round's updates become the next global model, by name (`--aggregation median`,
`trimmed-mean:1`, `clipped:2.5`).

A rule is a class registered here under its name. The round loop sends the model, has the workers train, settles
who finished, and hands the rule a `RoundUpdates`; it never names a rule. A rule declares what it needs:

- `streams`: True, and every update is folded into one running weighted sum as it arrives, so the coordinator holds
  one accumulator whatever the number of workers; the rule may fetch an update again to correct the sum
  (`add_scaled`) before it takes the mean. False, and the rule walks every update in step, chunk by chunk (`walk`),
  and reduces each coordinate across the workers: memory O(model + workers x chunk).
- `uses_weights`: whether an update's weight (its samples, or FedNova's normalised steps) changes the result. A
  strategy whose correction lives in the weights (FedNova) refuses a rule that ignores them.
- `minimum_workers()`: how many updates a round needs for the rule to mean anything.

Rules by Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018 (median,
trimmed mean) and Sun et al., "Can You Really Backdoor Federated Learning?", 2019 (norm clipping). Flower's Krum,
median and trimmed-mean strategies hold every worker's whole model; these never do.

Torch is not imported here: the settings model and `--help` check rules without it (reductions use tensor methods).
"""

from __future__ import annotations

import statistics
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, TypeVar

import structlog

if TYPE_CHECKING:
    import torch

log = structlog.get_logger()
N = TypeVar("N", int, float)

#: One reduction over dim 0 of a (workers, elements) tensor.
Reduce = Callable[["torch.Tensor"], "torch.Tensor"]


class Update(Protocol):
    """One worker's update, as a rule sees it."""

    @property
    def name(self) -> str:
        """The worker's."""

    @property
    def weight(self) -> float:
        """Its share of the weighted mean, before normalisation."""

    @property
    def distance(self) -> float:
        """L2 distance from the global model it was trained from (measured as it streamed)."""


class RoundUpdates(Protocol):
    """What the round loop offers a rule for one round."""

    @property
    def number(self) -> int:
        """The round."""

    @property
    def arrived(self) -> Sequence[Update]:
        """The updates that arrived intact, in the order their workers were asked."""

    @property
    def reference(self) -> Sequence[torch.Tensor]:
        """The global model the round's workers trained from, flat, in manifest order, in its own dtypes (read it,
        never write it)."""

    async def mean(self) -> list[torch.Tensor]:
        """The weighted mean of the streamed sum (streaming rules)."""

    async def add_scaled(self, update: Update, weight: float) -> None:
        """Fetch `update` again and fold its difference from the global model into the sum with `weight`, e.g.
        weight x (norm / distance - 1) pulls it onto a clipping norm (streaming rules)."""

    async def walk(self, reduce_for: Callable[[int], Reduce]) -> list[torch.Tensor]:
        """Every update in step, piece by piece; each coordinate of the result is `reduce_for(n)` of the n updates'
        values (non-streaming rules). A worker that breaks the walk is dropped and the walk starts again; a
        ValueError from `reduce_for` (too few updates) fails the round with its message."""


class AggregationRule(ABC):
    """One way to combine a round's updates; subclasses register themselves with `@register`."""

    name: ClassVar[str]
    parameter: ClassVar[str] = ""  # what `NAME:PARAM` sets, for help and errors ("" when it takes none)
    streams: ClassVar[bool] = True
    uses_weights: ClassVar[bool] = True

    @classmethod
    def parse(cls, param: str) -> AggregationRule:
        """The rule from the text after `NAME:` (never empty); ValueError saying what is allowed."""
        raise ValueError(f"{cls.name} takes no parameter")

    def minimum_workers(self) -> int:
        return 1

    @abstractmethod
    async def combine(self, updates: RoundUpdates) -> list[torch.Tensor]:
        """The round's aggregate, flat, one tensor per manifest entry, not yet installed."""

    def state_dict(self) -> dict:
        """What the rule learns from round to round (plain types), checkpointed with the model; most learn nothing."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Take up the state a checkpoint kept (state_dict's), on resuming a run."""
        del state  # a rule that learns nothing has nothing to take up

    def __str__(self) -> str:
        return self.name

    @classmethod
    def usage(cls) -> str:
        return f"{cls.name}[:{cls.parameter}]" if cls.parameter else cls.name


RULES: dict[str, type[AggregationRule]] = {}


def register(cls: type[AggregationRule]) -> type[AggregationRule]:
    """Make a rule available by its name (a class decorator)."""
    if RULES.get(cls.name, cls) is not cls:
        raise ValueError(f"aggregation {cls.name!r} is already registered by {RULES[cls.name].__qualname__}")
    RULES[cls.name] = cls
    return cls


def choices() -> str:
    return ", ".join(cls.usage() for cls in RULES.values())


def weighted_rules() -> list[str]:
    return [name for name, cls in RULES.items() if cls.uses_weights]


#: Installed packages add rules under this entry-point group: `NAME = "package.module:RuleClass"`.
ENTRY_POINT_GROUP = "fedpi.aggregations"


def installed(name: str) -> type[AggregationRule] | None:
    """The rule an installed package offers under `name`, imported and registered now (None if there is none).
    Only what the operator installed is imported, under its entry point's own name: never a module a request names."""
    from importlib import metadata

    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP, name=name):
        try:
            cls = ep.load()
        except (Exception, SystemExit) as exc:  # a broken plug-in is the operator's to fix; say which and why
            raise ValueError(
                f"aggregation {name!r} ({ep.value}) cannot be imported: {type(exc).__name__}: {exc}"
            ) from None
        if not (isinstance(cls, type) and issubclass(cls, AggregationRule)) or cls.name != name:
            raise ValueError(f"entry point {name} = {ep.value} is not an AggregationRule named {name!r}")
        return register(cls)
    return None


def parse_aggregation(spec: str) -> AggregationRule:
    """`NAME` or `NAME:PARAM` of a registered or installed rule; ValueError naming the choices."""
    name, _, param = spec.strip().partition(":")
    cls = RULES.get(name) or installed(name)
    if cls is None:
        raise ValueError(f"unknown aggregation {spec!r}; choose from {choices()}")
    try:
        return cls.parse(param) if param else cls()
    except ValueError as exc:
        raise ValueError(f"aggregation {spec!r}: {exc}") from None


@register
@dataclass(frozen=True)
class WeightedMean(AggregationRule):
    """FedAvg's rule: the mean of the updates weighted by each one's weight (McMahan et al., AISTATS 2017)."""

    name: ClassVar[str] = "fedavg"

    async def combine(self, updates: RoundUpdates) -> list[torch.Tensor]:
        return await updates.mean()


@register
@dataclass(frozen=True)
class Clipped(AggregationRule):
    """The weighted mean with every update further than `clip_norm` from the global model pulled back onto it (by
    default the round's median distance): one worker cannot drag the model further than an ordinary one."""

    name: ClassVar[str] = "clipped"
    parameter: ClassVar[str] = "norm"
    clip_norm: float | None = None

    @classmethod
    def parse(cls, param: str) -> Clipped:
        return cls(_number(cls.name, param, float, "a positive L2 norm", lambda v: 0 < v < float("inf")))

    async def combine(self, updates: RoundUpdates) -> list[torch.Tensor]:
        norm = self.clip_norm or statistics.median(u.distance for u in updates.arrived)
        for u in [u for u in updates.arrived if u.distance > norm]:
            log.info("update_clipped", worker=u.name, distance=round(u.distance, 4), clip_norm=round(norm, 4))
            await updates.add_scaled(u, u.weight * (norm / u.distance - 1))
        return await updates.mean()

    def __str__(self) -> str:
        return self.name if self.clip_norm is None else f"{self.name}:{self.clip_norm}"


@register
@dataclass(frozen=True)
class Median(AggregationRule):
    """The coordinate-wise median; the mean of the two middle values when the count is even."""

    name: ClassVar[str] = "median"
    streams: ClassVar[bool] = False
    uses_weights: ClassVar[bool] = False

    async def combine(self, updates: RoundUpdates) -> list[torch.Tensor]:
        return await updates.walk(lambda n: median)


@register
@dataclass(frozen=True)
class TrimmedMean(AggregationRule):
    """Per coordinate, the mean after dropping the `trim` largest and `trim` smallest values (by default a fifth of
    the round's updates, at least 1)."""

    name: ClassVar[str] = "trimmed-mean"
    parameter: ClassVar[str] = "k"
    streams: ClassVar[bool] = False
    uses_weights: ClassVar[bool] = False
    trim: int | None = None

    @classmethod
    def parse(cls, param: str) -> TrimmedMean:
        return cls(
            _number(cls.name, param, int, "a whole number k >= 0 (values dropped at each end)", lambda v: v >= 0)
        )

    def trim_for(self, workers: int) -> int:
        return self.trim if self.trim is not None else max(1, workers // 5)

    def minimum_workers(self) -> int:
        return 2 * self.trim + 1 if self.trim is not None else 1

    def reduce_for(self, workers: int) -> Reduce:
        trim = self.trim_for(workers)
        if workers <= 2 * trim:
            raise ValueError(
                f"trimmed-mean drops {trim} value(s) at each end and needs more than {2 * trim} updates, got {workers}"
            )
        return lambda stack: trimmed_mean(stack, trim)

    async def combine(self, updates: RoundUpdates) -> list[torch.Tensor]:
        return await updates.walk(self.reduce_for)

    def __str__(self) -> str:
        return self.name if self.trim is None else f"{self.name}:{self.trim}"


def median(stack: torch.Tensor) -> torch.Tensor:
    n = stack.shape[0]
    ordered = stack.sort(dim=0).values
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def trimmed_mean(stack: torch.Tensor, trim: int) -> torch.Tensor:
    return stack.sort(dim=0).values[trim : stack.shape[0] - trim].mean(dim=0)


def _number(name: str, text: str, kind: Callable[[str], N], allowed: str, ok: Callable[[N], bool]) -> N:
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise ValueError(f"{name} takes {allowed}, not {text!r}")
    return value
