"""The activation-recomputation policy of a plan, typed and validated in one place.

What each policy does to the joint graph is graphllm/recompute.py; this is what the user chose:
MindSpeed's `--recompute-granularity full` (`method` uniform or block, `layers`), selective recomputation
of op kinds (`ops`: attention, activation, norm; optionally only the first `layers` layers), or a memory
`budget` for the min-cut partitioner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from graphllm.errors import GraphllmError
from graphllm.options import check_fields, option

RECOMPUTE_POLICIES = ("none", "full", "selective", "budget")
SELECTIVE_OPS = ("attention", "activation", "norm")
TAKES = {"none": (), "full": ("method", "layers"), "selective": ("ops", "layers"), "budget": ("budget",)}
"""The options each policy reads."""


def _check_method(value: str | None) -> None:
    if value is not None and value not in ("uniform", "block"):
        raise GraphllmError(f"--recompute full: method must be uniform or block, got {value!r}")


def _check_ops(value: tuple[str, ...] | None) -> None:
    if value is not None and (not value or any(o not in SELECTIVE_OPS for o in value)):
        raise GraphllmError(f"--recompute-ops must be a comma-separated subset of {','.join(SELECTIVE_OPS)}, "
                            f"got {','.join(value) or 'nothing'}")


def _check_budget(value: float | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1):
        raise GraphllmError(f"--recompute-budget must be a fraction in [0, 1], got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class RecomputeConfig:
    """Which forward values the backward recomputes instead of keeping (a partition policy)."""

    FLAG_PREFIX: ClassVar[str] = "recompute"

    policy: Literal["none", "full", "selective", "budget"] = option(
        "none", flag="--recompute", help="activation recomputation: none saves every activation the backward reads")
    method: Literal["uniform", "block"] | None = option(
        None, check=_check_method, help="full: uniform (groups of --recompute-layers layers) or block (only the "
                                        "first --recompute-layers layers) (default uniform)")
    layers: int | None = option(None, minimum=1, help="full: N of --recompute-method (default 1); selective: only "
                                                      "the first N layers")
    ops: tuple[str, ...] | None = option(None, check=_check_ops, metavar="attention,activation,norm",
                                         help="selective: comma-separated op kinds to recompute (default all three)")
    budget: float | None = option(None, check=_check_budget, metavar="F",
                                  help="budget: activation memory fraction in [0, 1] the partitioner may keep")

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("method", "layers", "ops", "budget"):
            if getattr(self, name) is not None and name not in TAKES[self.policy]:
                raise GraphllmError(f"--recompute-{name} does not apply to --recompute {self.policy}")
        if self.policy == "budget" and self.budget is None:
            raise GraphllmError("--recompute budget needs --recompute-budget F (a fraction in [0, 1])")
        defaults = {"full": {"method": "uniform", "layers": 1}, "selective": {"ops": SELECTIVE_OPS}}
        for name, value in defaults.get(self.policy, {}).items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)

    @property
    def enabled(self) -> bool:
        return self.policy != "none"

    def describe(self) -> str:
        """`full uniform 1`, `selective attention,norm`, `budget 0.5`, `none`."""
        parts = [self.policy]
        if self.policy == "full":
            parts += [self.method, str(self.layers)]
        elif self.policy == "selective":
            parts.append(",".join(self.ops) + (f" first {self.layers}" if self.layers else ""))
        elif self.policy == "budget":
            parts.append(f"{self.budget:g}")
        return " ".join(parts)
