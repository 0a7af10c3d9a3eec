"""The activation-offload policy of a plan ("swap attention"), typed and validated in one place.

What it does to the partitioned graphs is graphllm/offload_activations.py; this is what the user chose:
which saved activations (`all` of a decoder layer's, or those of its `attention` — MindSpeed's
swap-attention), in which layers (the first `layers`), or as much as a `budget` of device-resident bytes
demands, and how far ahead of its first use the backward prefetches each value (`prefetch_layers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from graphllm.errors import GraphllmError
from graphllm.options import check_fields, option


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivationOffloadConfig:
    """Which saved activations live in host memory between the forward and the backward."""

    FLAG_PREFIX: ClassVar[str] = "offload"

    activations: Literal["none", "all", "attention"] = option(
        "none", help="saved activations moved to host memory after the forward and prefetched in the backward: "
                     "all of a decoder layer's, or attention's inputs and outputs (swap attention); the saving "
                     "applies on cuda and npu (on cpu host and device are one memory)")
    layers: int | None = option(None, minimum=1, help="offload only in the first N decoder layers (default: every "
                                                      "layer, or as --offload-budget needs)")
    budget: float | None = option(None, minimum=0, maximum=1, metavar="F",
                                  help="keep at most this fraction of the saved activation bytes on the device: "
                                       "offload the chosen kind, first layers first, until it holds")
    prefetch_layers: int = option(1, minimum=0, help="the backward prefetches a layer's values this many layers "
                                                     "ahead of their first use (0: right before it)")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.activations == "none":
            for name, default in (("layers", None), ("budget", None), ("prefetch_layers", 1)):
                if getattr(self, name) != default:
                    raise GraphllmError(f"--offload-{name.replace('_', '-')} needs --offload-activations all or "
                                        "attention")
        if self.layers is not None and self.budget is not None:
            raise GraphllmError("--offload-layers and --offload-budget choose the offloaded layers two ways; give one")

    @property
    def enabled(self) -> bool:
        return self.activations != "none"

    def describe(self) -> str:
        """`attention first 2 prefetch 1`, `all budget 0.5 prefetch 1`, `none`."""
        if not self.enabled:
            return "none"
        where = f"first {self.layers}" if self.layers else f"budget {self.budget:g}" if self.budget is not None else \
            "every layer"
        return f"{self.activations} {where} prefetch {self.prefetch_layers}"
