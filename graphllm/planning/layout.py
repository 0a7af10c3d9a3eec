"""The parallel layout: how many ranks split the model which way, and where each rank sits.

Rank order follows Megatron-Core's default (tensor fastest, then context, then data, then pipeline: tp-cp-dp-pp):
    rank = pp_rank * (dp * cp * tp) + dp_rank * (cp * tp) + cp_rank * tp + tp_rank
so the ranks of one tensor-parallel group are neighbours (one node, the fastest links), and a context-parallel
group's next. Inside a cp group, cp_rank = ring_rank * ulysses_size + ulysses_rank: a Ulysses all-to-all group is
consecutive cp ranks (graphllm.planning.context lays the tokens out the same way).

Expert parallelism is carved out of the data-parallel ranks: dp_rank = edp_rank * ep + ep_rank, so an expert-parallel
group is ep consecutive data-parallel ranks with the same cp rank, and the replicas of one rank's experts are the
ranks with the same ep_rank: "edp", times the cp ranks under context parallelism ("edp_cp"). (Megatron-Core carves
its expert groups out of dp × cp instead.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from graphllm.errors import GraphllmError
from graphllm.options import check_fields, option
from graphllm.planning.compat import check_layout
from graphllm.planning.context import check_divisible


@dataclass(frozen=True, slots=True)
class Coords:
    """One rank's position in the (pp, dp, cp, tp) grid."""

    pp: int
    dp: int
    tp: int
    cp: int = 0


GRID = ("pp", "edp", "ep", "cp_ring", "cp_ulysses", "tp")
"""The grid's dimensions, slowest first (data-parallel as expert-data × expert, context-parallel as ring × Ulysses)."""
KIND_DIMS = {"pp": ("pp",), "dp": ("edp", "ep"), "tp": ("tp",), "cp": ("cp_ring", "cp_ulysses"),
             "cp_ring": ("cp_ring",), "cp_ulysses": ("cp_ulysses",), "dp_cp": ("edp", "ep", "cp_ring", "cp_ulysses"),
             "ep": ("ep",), "edp": ("edp",), "edp_cp": ("edp", "cp_ring", "cp_ulysses")}
"""Each process-group kind: the grid dimensions its ranks differ in ("dp_cp": the gradient-averaging group; "ep": the
ranks that share out each MoE layer's experts, "edp": the replicas of one rank's experts at cp 1, "edp_cp" at any
cp: context-parallel ranks hold the same experts too)."""


CHUNK_CHOICES = (1, 2, 4, 8)
"""Chunk counts for communication/computation overlap (MindSpeed's --coc-parallel-num)."""


def _check_pp_layers(value: tuple[int, ...] | None) -> None:
    if value is not None and any(n < 0 for n in value):
        raise GraphllmError("--pp-layers entries must be ≥ 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """tp × cp × pp × dp ranks, plus the options that shape each kind: the plan's parallel section."""

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
    cp: int = option(1, minimum=1, help="context-parallel ranks: each holds 1/cp of every sequence's tokens")
    cp_algo: Literal["ring", "ulysses", "hybrid"] = option(
        "ring", help="ring attention (zig-zag load balance), Ulysses all-to-all over heads, or hybrid: Ulysses "
                     "inside groups of --cp-ulysses ranks, ring across them")
    cp_ulysses: int = option(1, minimum=1, help="the Ulysses degree of --cp-algo hybrid (ranks per all-to-all "
                                                "group; --cp / --cp-ulysses ranks around the ring)")
    ep: int = option(1, minimum=1, help="expert-parallel ranks, carved out of --dp: each holds 1/ep of every MoE "
                                        "layer's experts and computes them for the tokens of the ep group")
    etp: int = option(1, minimum=1, help="expert tensor-parallel ranks: 1 (each tp rank holds its ep group's experts "
                                         "whole and routes 1/tp of the tokens) or --tp (every expert's MLP split "
                                         "over the tp ranks like a dense MLP: gate/up by columns, down by rows)")

    def __post_init__(self) -> None:
        check_fields(self)
        self.check_options()

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    @property
    def ulysses_size(self) -> int:
        """Ranks of one Ulysses all-to-all group (1: pure ring)."""
        return {"ring": 1, "ulysses": self.cp, "hybrid": self.cp_ulysses}[self.cp_algo]

    @property
    def ring_size(self) -> int:
        """Ranks around one attention ring (1: pure Ulysses)."""
        return self.cp // self.ulysses_size

    def grid_sizes(self) -> dict[str, int]:
        """Ranks along each GRID dimension."""
        return {"pp": self.pp, "dp": self.dp, "edp": self.dp // self.ep, "ep": self.ep, "cp_ring": self.ring_size,
                "cp_ulysses": self.ulysses_size, "tp": self.tp}

    def group_size(self, kind: str) -> int:
        """Ranks in each group of `kind` (one of KIND_DIMS)."""
        return math.prod(self.grid_sizes()[d] for d in _dims_of(kind))

    def _grid(self, c: Coords) -> dict[str, int]:
        ring, ulysses = divmod(c.cp, self.ulysses_size)
        edp, ep = divmod(c.dp, self.ep)
        return {"pp": c.pp, "dp": c.dp, "edp": edp, "ep": ep, "cp_ring": ring, "cp_ulysses": ulysses, "tp": c.tp}

    def group_rank(self, kind: str, c: Coords) -> int:
        """The index of the rank at `c` inside its group of `kind` (its place among the group's sorted ranks)."""
        dims, grid, index = self.grid_sizes(), self._grid(c), 0
        for d in _dims_of(kind):  # slowest first, as in GRID
            index = index * dims[d] + grid[d]
        return index

    @property
    def num_stages(self) -> int:
        return self.pp * self.vpp

    def coords(self, rank: int) -> Coords:
        if not 0 <= rank < self.world_size:
            raise GraphllmError(f"rank {rank} is outside a world of {self.world_size} ({self.describe()})")
        tp, cp, dp = self.tp, self.cp, self.dp
        return Coords(pp=rank // (dp * cp * tp), dp=(rank // (cp * tp)) % dp, cp=(rank // tp) % cp, tp=rank % tp)

    def rank_of(self, c: Coords) -> int:
        return ((c.pp * self.dp + c.dp) * self.cp + c.cp) * self.tp + c.tp

    def group_ranks(self, kind: str) -> list[list[int]]:
        """All groups of one kind (KIND_DIMS: "tp", "cp", "cp_ring", "cp_ulysses", "dp", "dp_cp", "pp"), each a
        sorted rank list, in a fixed order (every rank must create every group, in the same order)."""
        varying = _dims_of(kind)
        groups: dict[tuple, list[int]] = {}
        for r in range(self.world_size):
            grid = self._grid(self.coords(r))
            key = tuple(grid[d] for d in GRID if d not in varying)
            groups.setdefault(key, []).append(r)
        return [groups[k] for k in sorted(groups)]

    def stages_of(self, pp_rank: int) -> list[int]:
        """Pipeline stage indices held by a pipeline rank: pp_rank, pp_rank + pp, ... (interleaved)."""
        return [chunk * self.pp + pp_rank for chunk in range(self.vpp)]

    @property
    def grads_reduced_in_graph(self) -> bool:
        """Whether the backward graph averages data-parallel gradients itself (passes/dp_grad_reduce.py:
        one backward makes one step) or the engine does after the step's last micro-batch."""
        return self.dp * self.cp > 1 and self.pp == 1 and self.micro_batches == 1 and self.ep == 1

    @property
    def grad_kind(self) -> str:
        """The group gradients are averaged over: the replicas of each parameter ("dp", and "dp_cp" when context
        parallelism replicates them over cp ranks too)."""
        return "dp_cp" if self.cp > 1 else "dp"

    @property
    def expert_grad_kind(self) -> str:
        """The group an expert shard's gradient is averaged over (expert parallelism): its replicas, the
        expert-data-parallel ranks ("edp") and, under context parallelism, their cp ranks too ("edp_cp")."""
        return "edp_cp" if self.cp > 1 else "edp"

    def describe(self) -> str:
        parts = [f"tp{self.tp}", f"pp{self.pp}", f"dp{self.dp}"]
        if self.cp > 1:
            algo = f"hybrid-u{self.cp_ulysses}" if self.cp_algo == "hybrid" else self.cp_algo
            parts[1:1] = [f"cp{self.cp}-{algo}"]
        if self.ep > 1:
            parts.append(f"ep{self.ep}")
        if self.etp > 1:
            parts.append(f"etp{self.etp}")
        if self.vpp > 1:
            parts.append(f"vpp{self.vpp}")
        if self.sequence_parallel:
            parts.append("sp")
        if self.zero1:
            parts.append("zero1")
        main = 4 if self.cp > 1 else 3
        return "×".join(parts[:main]) + ("+" + "+".join(parts[main:]) if parts[main:] else "")

    def check_options(self) -> None:
        """Checks that need no model: options that need a dimension > 1 (graphllm/planning/compat.py's layout
        rules), sizes that must agree."""
        check_layout(self)
        if self.pp > 1 and self.micro_batches < self.pp:
            raise GraphllmError(f"--micro-batches {self.micro_batches} is fewer than --pp {self.pp}: the pipeline "
                                f"would never fill; use --micro-batches ≥ {self.pp}")
        if self.vpp > 1 and self.micro_batches % self.pp:
            raise GraphllmError(f"interleaved 1F1B needs --micro-batches divisible by --pp; got {self.micro_batches} "
                                f"and {self.pp}")
        if self.pp_layers is not None and len(self.pp_layers) != self.num_stages:
            raise GraphllmError(f"--pp-layers lists {len(self.pp_layers)} stages but pp×vpp = {self.num_stages}")
        self._check_cp_options()
        if self.ep > 1 and self.zero1:
            raise GraphllmError("--ep with --zero1 is not supported yet (ZeRO-1 shards optimizer states over the whole "
                                "data-parallel group, whose ranks hold different experts); drop --zero1")
        if self.dp % self.ep:
            raise GraphllmError(f"--ep {self.ep} must divide --dp {self.dp}: expert-parallel groups are carved out of "
                                f"the data-parallel ranks; use a --dp that is a multiple of --ep")
        if self.etp not in (1, self.tp):
            raise GraphllmError(f"--etp {self.etp} must be 1 or --tp ({self.tp}): experts are split over the whole "
                                "tensor-parallel group or not at all")

    def _check_cp_options(self) -> None:
        if self.cp_algo == "hybrid":
            u = self.cp_ulysses
            if not 1 < u < self.cp or self.cp % u:
                raise GraphllmError(f"--cp-algo hybrid needs --cp-ulysses strictly between 1 and --cp {self.cp} and "
                                    f"dividing it, got --cp-ulysses {u}; pick a proper divisor of --cp (or another "
                                    "--cp-algo)")
        elif self.cp_ulysses != 1:
            raise GraphllmError(f"--cp-ulysses {self.cp_ulysses} applies only to --cp-algo hybrid (got --cp-algo "
                                f"{self.cp_algo}); use --cp-algo hybrid or leave --cp-ulysses at 1")
        elif self.cp_algo != "ring" and self.cp == 1:
            raise GraphllmError(f"--cp-algo {self.cp_algo} needs --cp > 1 (it splits sequences over context-parallel "
                                "ranks)")

    def check_model(self, cfg: Any, *, batch_size: int, seq_len: int) -> None:
        """Refuse a layout the model's shapes cannot be split by, naming the dimension and the fix."""
        self.check_options()
        tp = self.tp
        experts = getattr(cfg, "num_experts", 0)
        if self.ep > 1 and not experts:
            raise GraphllmError(f"--ep {self.ep} shares out a mixture-of-experts model's experts, but {cfg.model_type} "
                                "is dense; use --ep 1 (or --dp for data parallelism)")
        if experts % self.ep:
            raise GraphllmError(f"--ep {self.ep} does not divide the model's {experts} experts (num_experts); choose an "
                                "--ep that divides it")
        if self.etp > 1 and not experts:
            raise GraphllmError(f"--etp {self.etp} splits a mixture-of-experts model's experts, but {cfg.model_type} "
                                "is dense; use --etp 1")
        if self.etp > 1 and cfg.expert_size % self.etp:
            raise GraphllmError(f"--etp {self.etp} does not divide the experts' MLP width {cfg.expert_size} "
                                "(moe_intermediate_size); choose --etp 1 or a --tp that divides it")
        if self.ep > 1 and tp > 1 and self.etp == 1 and batch_size * seq_len % tp:
            raise GraphllmError(f"--ep {self.ep} with --tp {tp}: each tp rank routes 1/tp of a micro-batch's "
                                f"{batch_size * seq_len} tokens (--batch-size × --seq-len), which --tp does not divide; "
                                "choose sizes whose product --tp divides")
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
        if self.cp > 1:
            self._check_cp_model(cfg, seq_len)
        elif self.sequence_parallel and seq_len % tp:
            raise GraphllmError(f"--sequence-parallel: --seq-len {seq_len} is not divisible by --tp {tp}")
        if self.pp_layers is not None:
            if sum(self.pp_layers) != cfg.num_hidden_layers:
                raise GraphllmError(f"--pp-layers {','.join(map(str, self.pp_layers))} sums to {sum(self.pp_layers)} "
                                    f"but the model has {cfg.num_hidden_layers} layers")
        elif self.num_stages > cfg.num_hidden_layers:
            raise GraphllmError(f"pp×vpp = {self.num_stages} stages but the model has {cfg.num_hidden_layers} layers; "
                                "lower --pp/--vpp or give --pp-layers with empty stages")

    def _check_cp_model(self, cfg: Any, seq_len: int) -> None:
        """The sequence must cut into the layout's pieces; Ulysses spreads each tp rank's heads over its group."""
        check_divisible(seq_len, self.cp, self.ulysses_size)
        window_of = getattr(cfg, "window_of", lambda layer: None)
        windows = [w for w in map(window_of, range(cfg.num_hidden_layers)) if w is not None and w < seq_len]
        if windows:
            raise GraphllmError(f"--cp {self.cp}: this model's sliding-window attention (window {min(windows)} < "
                                f"--seq-len {seq_len}) is not split over context-parallel ranks yet; use --cp 1, or a "
                                "--seq-len no longer than the window")
        tp, u = self.tp, self.ulysses_size
        if u > 1:
            flag = "--cp" if self.cp_algo == "ulysses" else "--cp-ulysses"
            heads = cfg.num_attention_heads // tp
            if heads % u:
                raise GraphllmError(f"{flag} {u}: Ulysses spreads each tensor-parallel rank's {heads} attention heads "
                                    f"(num_attention_heads {cfg.num_attention_heads} / --tp {tp}) over {u} ranks; "
                                    f"choose a Ulysses degree that divides {heads} (or --cp-algo ring)")
            kv = max(1, cfg.num_key_value_heads // tp)
            if kv % u and u % kv:
                raise GraphllmError(f"{flag} {u}: each tensor-parallel rank's {kv} key/value heads can be split over "
                                    f"or replicated across the Ulysses ranks, not both; choose a Ulysses degree that "
                                    f"divides or is a multiple of {kv} (or --cp-algo ring)")
        local = seq_len // self.cp
        if self.sequence_parallel and local % tp:
            raise GraphllmError(f"--sequence-parallel: each context-parallel rank's {local} tokens (--seq-len "
                                f"{seq_len} / --cp {self.cp}) are not divisible by --tp {tp}; choose a --seq-len "
                                "whose 1/cp is a multiple of --tp")


def _dims_of(kind: str) -> tuple[str, ...]:
    if kind not in KIND_DIMS:
        raise GraphllmError(f"unknown process group kind {kind!r}; expected one of {', '.join(KIND_DIMS)}")
    return KIND_DIMS[kind]
