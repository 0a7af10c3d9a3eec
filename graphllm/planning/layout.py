"""The parallel layout: how many ranks split the model which way, and where each rank sits.

Rank order follows Megatron-Core's default (tensor fastest, then data, then pipeline):
    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank
so the ranks of one tensor-parallel group are neighbours (one node, the fastest links).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from graphllm.errors import GraphllmError
from graphllm.options import check_fields, option


@dataclass(frozen=True, slots=True)
class Coords:
    """One rank's position in the (pp, dp, tp) grid."""

    pp: int
    dp: int
    tp: int


CHUNK_CHOICES = (1, 2, 4, 8)
"""Chunk counts for communication/computation overlap (MindSpeed's --coc-parallel-num)."""


def _check_pp_layers(value: tuple[int, ...] | None) -> None:
    if value is not None and any(n < 0 for n in value):
        raise GraphllmError("--pp-layers entries must be ≥ 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """tp × pp × dp ranks, plus the options that shape each kind: the plan's parallel section."""

    tp: int = option(1, minimum=1, help="tensor-parallel ranks (Megatron column/row-parallel layers, "
                                        "vocab-parallel embedding and loss)")
    pp: int = option(1, minimum=1, help="pipeline-parallel ranks (the graph split into stages at layer boundaries)")
    dp: int = option(1, minimum=1, help="data-parallel ranks (each takes batch-size × micro-batches rows of "
                                        "every step's batch)")
    vpp: int = option(1, minimum=1, help="virtual pipeline stages (model chunks) per pipeline rank: interleaved "
                                         "1F1B when > 1")
    sequence_parallel: bool = option(False, help="shard norms/residuals by sequence over the tensor-parallel group")
    zero1: bool = option(False, help="distributed optimizer: AdamW states and master weights sharded over the "
                                     "data-parallel group")
    micro_batches: int = option(1, minimum=1, help="micro-batches per step per data-parallel rank (the "
                                                   "pipeline's fill; gradient accumulation)")
    pp_layers: tuple[int, ...] | None = option(None, metavar="N,N,...", check=_check_pp_layers,
                                               help="decoder layers per pipeline stage (pp×vpp entries, 0 allowed), "
                                                    "e.g. 3,3,2,2 (default: balanced by FLOPs)")
    tp_plan: Literal["graphllm", "hf"] = option("graphllm", help="tensor-parallel plan: graphllm's per-family one, "
                                                                 "or transformers' base_model_tp_plan")
    coc_parallel_num: int = option(1, choices=CHUNK_CHOICES, help="chunks per tensor-parallel collective, to "
                                                                  "overlap it with matmuls (1: off)")
    mc2: bool = option(False, help="fuse tensor-parallel matmuls with their collectives (torch_npu MC2 kernels on "
                                   "--backend npu; --coc-parallel-num CoC chunks elsewhere)")

    def __post_init__(self) -> None:
        check_fields(self)
        self.check_options()

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def num_stages(self) -> int:
        return self.pp * self.vpp

    def coords(self, rank: int) -> Coords:
        if not 0 <= rank < self.world_size:
            raise GraphllmError(f"rank {rank} is outside a world of {self.world_size} (tp{self.tp}×pp{self.pp}×dp{self.dp})")
        return Coords(pp=rank // (self.dp * self.tp), dp=(rank // self.tp) % self.dp, tp=rank % self.tp)

    def rank_of(self, c: Coords) -> int:
        return c.pp * self.dp * self.tp + c.dp * self.tp + c.tp

    def group_ranks(self, kind: str) -> list[list[int]]:
        """All groups of one kind ("tp", "dp", "pp"), each a sorted rank list, in a fixed order
        (every rank must create every group, in the same order)."""
        sizes = {"pp": self.pp, "dp": self.dp, "tp": self.tp}
        if kind not in sizes:
            raise GraphllmError(f"unknown process group kind {kind!r}; expected tp, dp or pp")
        groups: dict[tuple, list[int]] = {}
        for r in range(self.world_size):
            c = self.coords(r)
            key = tuple(getattr(c, k) for k in ("pp", "dp", "tp") if k != kind)
            groups.setdefault(key, []).append(r)
        return [groups[k] for k in sorted(groups)]

    def stages_of(self, pp_rank: int) -> list[int]:
        """Pipeline stage indices held by a pipeline rank: pp_rank, pp_rank + pp, ... (interleaved)."""
        return [chunk * self.pp + pp_rank for chunk in range(self.vpp)]

    @property
    def grads_reduced_in_graph(self) -> bool:
        """Whether the backward graph averages data-parallel gradients itself (passes/dp_grad_reduce.py:
        one backward makes one step) or the engine does after the step's last micro-batch."""
        return self.dp > 1 and self.pp == 1 and self.micro_batches == 1

    def describe(self) -> str:
        parts = [f"tp{self.tp}", f"pp{self.pp}", f"dp{self.dp}"]
        if self.vpp > 1:
            parts.append(f"vpp{self.vpp}")
        if self.sequence_parallel:
            parts.append("sp")
        if self.zero1:
            parts.append("zero1")
        return "×".join(parts[:3]) + ("+" + "+".join(parts[3:]) if parts[3:] else "")

    def check_options(self) -> None:
        """Checks that need no model: options that need a dimension > 1, sizes that must agree."""
        if self.sequence_parallel and self.tp == 1:
            raise GraphllmError("--sequence-parallel needs --tp > 1 (it shards the tensor-parallel group's activations)")
        if self.zero1 and self.dp == 1:
            raise GraphllmError("--zero1 needs --dp > 1 (it shards optimizer states over the data-parallel group)")
        if self.vpp > 1 and self.pp == 1:
            raise GraphllmError("--vpp needs --pp > 1 (virtual stages interleave a pipeline)")
        if self.pp > 1 and self.micro_batches < self.pp:
            raise GraphllmError(f"--micro-batches {self.micro_batches} is fewer than --pp {self.pp}: the pipeline "
                                f"would never fill; use --micro-batches ≥ {self.pp}")
        if self.vpp > 1 and self.micro_batches % self.pp:
            raise GraphllmError(f"interleaved 1F1B needs --micro-batches divisible by --pp; got {self.micro_batches} "
                                f"and {self.pp}")
        if self.pp_layers is not None and len(self.pp_layers) != self.num_stages:
            raise GraphllmError(f"--pp-layers lists {len(self.pp_layers)} stages but pp×vpp = {self.num_stages}")
        if self.mc2 and self.tp == 1:
            raise GraphllmError("--mc2 needs --tp > 1 (it fuses tensor-parallel matmuls with their collectives)")
        if self.coc_parallel_num > 1 and self.tp == 1:
            raise GraphllmError("--coc-parallel-num needs --tp > 1 (it chunks tensor-parallel collectives)")

    def check_model(self, cfg: Any, *, batch_size: int, seq_len: int) -> None:
        """Refuse a layout the model's shapes cannot be split by, naming the dimension and the fix."""
        self.check_options()
        tp = self.tp
        checks = [
            (cfg.num_attention_heads, "attention heads (num_attention_heads)"),
            (cfg.intermediate_size, "MLP width (intermediate_size)"),
            (cfg.vocab_size, "vocabulary (vocab_size)"),
        ]
        for value, what in checks:
            if value % tp:
                raise GraphllmError(f"--tp {tp} does not divide the model's {what} {value}; choose a --tp that divides it")
        kv = cfg.num_key_value_heads
        if kv % tp and tp % kv:
            raise GraphllmError(f"--tp {tp} neither divides nor is a multiple of num_key_value_heads {kv}: "
                                "key/value heads can be split or replicated, not both; choose another --tp")
        if self.sequence_parallel and seq_len % tp:
            raise GraphllmError(f"--sequence-parallel: --seq-len {seq_len} is not divisible by --tp {tp}")
        if self.pp_layers is not None:
            if sum(self.pp_layers) != cfg.num_hidden_layers:
                raise GraphllmError(f"--pp-layers {','.join(map(str, self.pp_layers))} sums to {sum(self.pp_layers)} "
                                    f"but the model has {cfg.num_hidden_layers} layers")
        elif self.num_stages > cfg.num_hidden_layers:
            raise GraphllmError(f"pp×vpp = {self.num_stages} stages but the model has {cfg.num_hidden_layers} layers; "
                                "lower --pp/--vpp or give --pp-layers with empty stages")
        if self.pp > 1 and getattr(cfg, "tie_word_embeddings", False):
            raise GraphllmError("--pp > 1 with tied input/output embeddings (tie_word_embeddings) is not supported: "
                                "the first and last stages would share one weight; use --pp 1 or an untied model")
