"""The parallel layout: how many ranks split the model which way, and where each rank sits.

Rank order follows Megatron-Core's default (tensor fastest, then data, then pipeline):
    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank
so the ranks of one tensor-parallel group are neighbours (one node, the fastest links).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from graphllm.errors import GraphllmError


@dataclass(frozen=True, slots=True)
class Coords:
    """One rank's position in the (pp, dp, tp) grid."""

    pp: int
    dp: int
    tp: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """tp × pp × dp ranks, plus the options that shape each kind (from the compile plan)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    vpp: int = 1
    """Virtual pipeline stages (model chunks) per pipeline rank: interleaved 1F1B when > 1."""
    sequence_parallel: bool = False
    zero1: bool = False
    """Distributed optimizer: AdamW states and master weights sharded over the data-parallel group."""
    micro_batches: int = 1
    """Micro-batches per step on each data-parallel rank (the pipeline's fill; gradient accumulation)."""
    pp_layers: tuple[int, ...] | None = None
    """Decoder layers per pipeline stage (pp*vpp entries, 0 allowed); None balances by FLOPs."""

    @classmethod
    def from_plan(cls, plan: Any) -> "Layout":
        """From a CompilePlan or its plan.json dict."""
        get = plan.get if isinstance(plan, dict) else lambda k, d=None: getattr(plan, k, d)
        layers = get("pp_layers", None)
        return cls(tp=get("tp", 1), pp=get("pp", 1), dp=get("dp", 1), vpp=get("vpp", 1),
                   sequence_parallel=bool(get("sequence_parallel", False)), zero1=bool(get("zero1", False)),
                   micro_batches=get("micro_batches", 1), pp_layers=tuple(layers) if layers else None)

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
        """Checks that need no model: sizes positive, options that need a dimension > 1."""
        for name in ("tp", "pp", "dp", "vpp", "micro_batches"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise GraphllmError(f"--{name.replace('_', '-')} must be an integer ≥ 1, got {v!r}")
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
            if any(n < 0 for n in self.pp_layers):
                raise GraphllmError("--pp-layers entries must be ≥ 0")
        elif self.num_stages > cfg.num_hidden_layers:
            raise GraphllmError(f"pp×vpp = {self.num_stages} stages but the model has {cfg.num_hidden_layers} layers; "
                                "lower --pp/--vpp or give --pp-layers with empty stages")
        if self.pp > 1 and getattr(cfg, "tie_word_embeddings", False):
            raise GraphllmError("--pp > 1 with tied input/output embeddings (tie_word_embeddings) is not supported: "
                                "the first and last stages would share one weight; use --pp 1 or an untied model")
