"""The compile plan: every decision `graphllm compile` makes, as plain data (plan.json)."""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from graphllm.errors import GraphllmError
from graphllm.parallel.layout import Layout
from graphllm.passes import GraphPass, default_passes, order_passes


@dataclass(kw_only=True, slots=True)
class CompilePlan:
    """What to compile and how; `graphllm compile` flags map one-to-one onto these fields."""

    model: str = "tiny-llama"
    """A preset name (tiny-llama, small-llama) or an HF checkpoint directory."""
    batch_size: int = 4
    """Micro-batch size the graph is compiled for (static)."""
    seq_len: int = 128
    """Sequence length the graph is compiled for (static)."""
    backend: Literal["eager", "inductor", "npu"] = "inductor"
    """Which backend compiles the forward/backward graphs."""
    amp: Literal["fp32", "bf16"] = "fp32"
    """fp32, or bf16 autocast with fp32 master weights."""
    seed: int = 0
    """Seed for the random initialisation of preset models."""
    attn_implementation: Literal["sdpa", "eager"] | None = None
    """Override the model's attention form before capture (None: the config's own)."""
    passes: list[dict[str, Any]] = field(default_factory=list)
    """The pass pipeline as data: name, stage, options, origin module. Empty: the default pipeline."""
    disable: list[str] = field(default_factory=list)
    """Pass names to leave out."""
    device: Literal["cpu", "cuda", "npu"] = "cpu"
    """Where the model and batches live; `npu` is implied by backend npu."""
    npu_mode: Literal["max-autotune", "reduce-overhead"] = "max-autotune"
    """torchair CompilerConfig.mode: GE graph execution, or ACL graph capture."""
    npu_graph_dump: Literal["none", "txt", "pbtxt", "py"] = "none"
    """torchair graph dump format (CompilerConfig.debug.graph_dump), written under graphs/rank0/npu."""
    npu_frozen_parameter: bool = False
    """experimental_config.frozen_parameter: fixed parameter addresses (inference only)."""
    npu_tiling_schedule_optimize: bool = False
    """experimental_config.tiling_schedule_optimize: tiling on AI CPU (static shapes)."""
    npu_topology_sorting: Literal["DFS", "BFS", "RDFS", "StableRDFS"] = "DFS"
    """experimental_config.topology_sorting_strategy for GE's node order."""
    tp: int = 1
    """Tensor-parallel ranks (Megatron column/row-parallel layers, vocab-parallel embedding and loss)."""
    pp: int = 1
    """Pipeline-parallel ranks (the graph split into stages at layer boundaries)."""
    dp: int = 1
    """Data-parallel ranks (each takes batch_size * micro_batches rows of every step's batch)."""
    vpp: int = 1
    """Virtual pipeline stages per pipeline rank (interleaved 1F1B when > 1)."""
    sequence_parallel: bool = False
    """Shard norms and residuals by sequence over the tensor-parallel group."""
    zero1: bool = False
    """Distributed optimizer: AdamW states sharded over the data-parallel group."""
    micro_batches: int = 1
    """Micro-batches per step per data-parallel rank (pipeline fill, or gradient accumulation)."""
    pp_layers: list[int] | None = None
    """Decoder layers per pipeline stage (pp*vpp entries); None balances stages by FLOPs."""
    coc_parallel_num: int = 1
    """Chunks per tensor-parallel collective for communication/computation overlap (1: off)."""
    mc2: bool = False
    """Fuse tensor-parallel matmuls with their collectives into MC2 ops (torch_npu's fused kernels on the
    npu backend; coc_parallel_num CoC chunks elsewhere)."""
    tp_plan: Literal["graphllm", "hf"] = "graphllm"
    """Which tensor-parallel plan: graphllm's per-family one, or transformers' base_model_tp_plan."""
    recompute: Literal["none", "full", "selective", "budget"] = "none"
    """Activation recomputation policy (graphllm/recompute.py): none saves every activation the backward reads."""
    recompute_options: dict[str, Any] = field(default_factory=dict)
    """The policy's options: full {method, layers}, selective {ops, layers}, budget {fraction}."""
    eod_reset: bool = False
    """The graph takes position_ids as a third input (after labels): positions restart at 0 at each packed
    sample and attention stays inside it (Megatron's --reset-position-ids with --reset-attention-mask;
    packed SFT needs it). False keeps the plain two-input graph."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise GraphllmError(f"--batch-size must be ≥ 1, got {self.batch_size}")
        if self.seq_len < 2:
            raise GraphllmError(f"--seq-len must be ≥ 2, got {self.seq_len}")
        if self.amp not in ("fp32", "bf16"):
            raise GraphllmError(f"--amp must be fp32 or bf16, got {self.amp!r}")
        if self.backend == "npu" and self.device == "cpu":
            self.device = "npu"
        self.layout().check_options()
        from graphllm.recompute import check_options

        self.recompute_options = check_options(self.recompute, self.recompute_options)
        if self.eod_reset and self.pp > 1:
            raise GraphllmError("--eod-reset with --pp > 1 is not supported yet (pipeline stages take no position "
                                "ids); use --pp 1")
        if (self.device == "npu") != (self.backend == "npu"):
            raise GraphllmError(f"--device {self.device} does not fit --backend {self.backend}: the npu backend runs "
                                "on --device npu, and only there")

    def layout(self) -> Layout:
        return Layout.from_plan(self)

    @property
    def global_batch_size(self) -> int:
        """Rows of one optimizer step: micro-batch × micro-batches × data-parallel ranks."""
        return self.batch_size * self.micro_batches * self.dp

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any], source: str) -> "CompilePlan":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise GraphllmError(f"{source}: unknown plan field(s) {', '.join(sorted(unknown))}; "
                                "it was written by another graphllm version — recompile")
        return cls(**d)


def describe_passes(passes: list[GraphPass]) -> list[dict[str, Any]]:
    out = []
    for p in passes:
        d = p.describe()
        d["origin"] = p.fn.__module__
        json.dumps(d)  # options must be plain data to live in plan.json
        out.append(d)
    return out


def resolve_passes(described: list[dict[str, Any]]) -> list[GraphPass]:
    """Turn plan.json's pass list back into GraphPass objects (importing user pass modules)."""
    if not described:
        return default_passes()
    resolved = []
    for d in described:
        try:
            module = importlib.import_module(d["origin"])
        except ImportError as e:
            raise GraphllmError(f"pass {d['name']!r} comes from module {d['origin']!r}, which cannot be "
                                f"imported ({e}); put it on PYTHONPATH or recompile without it") from e
        found = [v for v in vars(module).values() if isinstance(v, GraphPass) and v.name == d["name"]]
        if not found:
            raise GraphllmError(f"module {d['origin']!r} no longer defines pass {d['name']!r}; recompile")
        resolved.append(found[0].with_options(**d.get("options", {})))
    return resolved


def load_pass_spec(spec: str) -> GraphPass:
    """`module:attr` → the GraphPass object there (the CLI's --pass flag)."""
    mod_name, _, attr = spec.partition(":")
    if not attr:
        raise GraphllmError(f"--pass {spec!r}: expected MODULE:NAME, e.g. mypasses:count_matmuls")
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise GraphllmError(f"--pass {spec!r}: cannot load it ({e})") from e
    if not isinstance(obj, GraphPass):
        raise GraphllmError(f"--pass {spec!r} is a {type(obj).__name__}, not a function decorated with @graph_pass")
    return obj


def parallel_passes(layout: Layout, tp_plan: str = "graphllm", coc_chunks: int = 1,
                    mc2: bool = False) -> list[GraphPass]:
    """The sharding passes a layout needs (pipeline splitting is done by the compile step itself)."""
    from graphllm.passes.dp_grad_reduce import dp_grad_reduce, in_graph
    from graphllm.passes.sequence_parallel import sequence_parallel
    from graphllm.passes.tensor_parallel import tensor_parallel

    out = []
    if layout.tp > 1:
        out.append(tensor_parallel if tp_plan == "graphllm" else tensor_parallel.with_options(plan=tp_plan))
    if layout.sequence_parallel:
        out.append(sequence_parallel)
    if mc2:
        from graphllm.passes.mc2 import mc2 as mc2_pass

        if layout.tp == 1:
            raise GraphllmError("--mc2 needs --tp > 1 (it fuses tensor-parallel matmuls with their collectives)")
        out.append(mc2_pass.with_options(chunks=coc_chunks))  # the MC2 ops' CoC lowering takes the chunks
    elif coc_chunks > 1:
        from graphllm.passes.coc import coc

        if layout.tp == 1:
            raise GraphllmError("--coc-parallel-num needs --tp > 1 (it chunks tensor-parallel collectives)")
        out.append(coc.with_options(chunks=coc_chunks))
    if in_graph(layout):
        out.append(dp_grad_reduce)
    return out


def pipeline_for(plan: CompilePlan, extra: list[GraphPass] = ()) -> list[GraphPass]:
    passes = resolve_passes(plan.passes) + list(extra)
    names = {p.name for p in passes}
    passes += [p for p in parallel_passes(plan.layout(), plan.tp_plan, plan.coc_parallel_num, plan.mc2) if p.name not in names]
    return order_passes(passes, disable=plan.disable)
