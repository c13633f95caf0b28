"""An aggregation rule by name and parameter (`--aggregation median`, `trimmed-mean:1`, `clipped:2.5`), without
torch: the settings model and the command lines check rules by it; coordinator_service.engine.robust computes them."""

from __future__ import annotations

from dataclasses import dataclass

AGGREGATIONS = ("fedavg", "median", "trimmed-mean", "clipped")


@dataclass(frozen=True)
class Aggregation:
    """An aggregation rule and its parameter: `trim` for trimmed-mean, `clip_norm` for clipped (None: default)."""

    rule: str = "fedavg"
    trim: int | None = None
    clip_norm: float | None = None

    @property
    def coordinate_wise(self) -> bool:
        """Whether the rule needs every worker's stream at once (else updates are folded as they arrive)."""
        return self.rule in ("median", "trimmed-mean")

    def trim_for(self, workers: int) -> int:
        """How many values trimmed-mean drops at each end, for this many workers (default: a fifth, at least 1)."""
        return self.trim if self.trim is not None else max(1, workers // 5)

    def minimum_workers(self) -> int:
        return 2 * self.trim + 1 if self.rule == "trimmed-mean" and self.trim is not None else 1

    def __str__(self) -> str:
        param = self.trim if self.rule == "trimmed-mean" else self.clip_norm
        return self.rule if param is None else f"{self.rule}:{param}"


def parse_aggregation(spec: str) -> Aggregation:
    """'fedavg' | 'median' | 'trimmed-mean[:k]' | 'clipped[:norm]'."""
    rule, _, param = spec.strip().partition(":")
    if rule not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {spec!r}; choose from fedavg, median, trimmed-mean[:k], clipped[:norm]")
    if not param:
        return Aggregation(rule)
    if rule in ("fedavg", "median"):
        raise ValueError(f"aggregation {spec!r}: {rule} takes no parameter")
    try:
        value = int(param) if rule == "trimmed-mean" else float(param)
    except ValueError:
        value = -1
    if rule == "trimmed-mean" and value >= 0:
        return Aggregation(rule, trim=value)
    if rule == "clipped" and value > 0:
        return Aggregation(rule, clip_norm=value)
    raise ValueError(
        f"aggregation {spec!r}: trimmed-mean takes a whole number k >= 0 (values dropped at each end), "
        f"clipped a positive L2 norm"
    )
