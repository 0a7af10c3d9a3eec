"""The plan's LoRA section: low-rank adapters on the base model's linear layers (passes/lora.py).

`rank` 0 means no adapters (full fine-tuning or pretraining). With adapters, every linear whose module
path matches one of `target` gets `y = x Wᵀ + s · (drop(x) Aᵀ) Bᵀ` with the base W frozen, A [r, in]
and B [out, r] trained, and s = alpha / r (alpha / √r with rsLoRA, Kalajdzievski 2023). `qlora` stores
the frozen base in NF4 (Dettmers et al. 2023) and dequantises it inside the op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from graphllm.errors import GraphllmError
from graphllm.options import check_fields, option

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Every linear of a Llama-family decoder layer (not the LM head), as PEFT's "all-linear" picks them."""


def _check_targets(value: tuple[str, ...]) -> None:
    if not value or any(not t for t in value):
        raise GraphllmError("--lora-target needs at least one module name pattern, e.g. q_proj,v_proj")


@dataclass(frozen=True, slots=True, kw_only=True)
class LoraConfig:
    """Low-rank adapters (LoRA / QLoRA); `rank` 0 leaves the model as it is."""

    FLAG_PREFIX: ClassVar[str] = "lora"

    rank: int = option(0, minimum=0, help="adapter rank r (0: no adapters, train every weight)")
    alpha: float | None = option(None, minimum=0, metavar="X",
                                 help="scale numerator: s = alpha / r (default: alpha = 2r, s = 2)")
    dropout: float = option(0.0, minimum=0, maximum=1, help="dropout on the adapter's input during training")
    target: tuple[str, ...] = option(DEFAULT_TARGETS, check=_check_targets, metavar="NAME[,NAME]",
                                     help="module-name patterns of the linears that get adapters (a name matches "
                                          "its last path component or a dotted suffix; fnmatch patterns allowed)")
    rslora: bool = option(False, help="rank-stabilised scale s = alpha / sqrt(r) (rsLoRA)")
    qlora: bool = option(False, flag="--qlora", help="store the frozen base weights in NF4 (block 64, double-quantised "
                                                     "scales) and dequantise them inside the op (QLoRA)")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.qlora and self.rank == 0:
            raise GraphllmError("--qlora needs --lora-rank > 0 (it quantises the base under the adapters)")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        alpha = self.alpha if self.alpha is not None else 2.0 * self.rank
        return alpha / (self.rank ** 0.5 if self.rslora else self.rank)
