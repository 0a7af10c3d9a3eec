"""The pipeline of a plan: every step from the captured graph to a compiled step, in order, with why.

`build_pipeline(plan)` is the one place that decides which steps run for a plan, at which stage, in
which order — for training, generation, evaluation and profiling. Stages, in the order they run:

    model      passes on the captured graph before autograd: the fusions (`default_passes()`, the last of
               which joins the LM head and its loss), user passes, parallel sharding (tensor_parallel,
               sequence_parallel) and overlap (coc, mc2)
    lower      lower_ops: graphllm ops → the backend's lowering table
    split      pipeline_split: the lowered graph → pp×vpp stage graphs and a loss graph (pp > 1)
    partition  aot_autograd splits each graph into forward and backward with the recompute policy
    train      passes on each forward/backward graph: user train passes, layer_markers (profiling),
               dp_grad_reduce, lower_collectives
    backend    the backend compiles each forward/backward graph

Built-in steps keep the order written here; each carries a one-line reason for its place. A user pass
goes at the end of its stage's user slot (after the fusions for `model`, first for `train`), and its
`after=` / `before=` constraints move it — never a built-in step. `graphllm inspect ART --pipeline`
prints the recorded pipeline.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Literal, Mapping, Sequence

from graphllm.errors import GraphllmError
from graphllm.passes import GraphPass, default_passes, order_passes
from graphllm.passes.manager import jsonable
from graphllm.passes.pipeline import why_default
from graphllm.plan import CompilePlan

Stage = Literal["model", "lower", "split", "partition", "train", "backend"]
Purpose = Literal["train", "eval", "generate", "profile_layers", "reference"]
PURPOSES = ("train", "eval", "generate", "profile_layers", "reference")
"""reference: the frozen reference model of a preference task (DPO): the plan's graph without its adapter
steps, so with LoRA the reference is the base model itself (the same Parameters, adapters off); with QLoRA the
adapter and quantize steps run and `adapters_off` then removes the adapters, so it reads the policy's NF4 base."""


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a pipeline: a graph pass, or a step done by the compile machinery itself."""

    name: str
    stage: Stage
    why: str
    graph_pass: GraphPass | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    """Options of a non-pass step (a pass's own options are bound on it)."""
    user: bool = False
    required: bool = False
    """The plan needs it (parallel sharding, lowering): refused by --disable."""
    origin: str = "graphllm.compile"

    def describe(self) -> dict[str, Any]:
        p = self.graph_pass
        return {"step": self.name, "stage": self.stage, "why": self.why, "user": self.user,
                "origin": p.fn.__module__ if p is not None else self.origin,
                "options": jsonable(p.options if p is not None else self.options),
                "changes_numerics": bool(p and p.changes_numerics)}


@dataclass(frozen=True, slots=True)
class Pipeline:
    """The ordered steps for one plan and purpose."""

    plan: CompilePlan
    purpose: Purpose
    steps: tuple[Step, ...]

    def passes(self, stage: Stage) -> list[GraphPass]:
        return [s.graph_pass for s in self.steps if s.stage == stage and s.graph_pass is not None]

    @property
    def model_passes(self) -> list[GraphPass]:
        return self.passes("model")

    @property
    def lowering(self) -> list[GraphPass]:
        return self.passes("lower")

    @property
    def train_passes(self) -> list[GraphPass]:
        return self.passes("train")

    @property
    def splits(self) -> bool:
        return any(s.stage == "split" for s in self.steps)

    def describe(self) -> list[dict[str, Any]]:
        """The steps as plain data (plan.json's "pipeline"; `graphllm inspect --pipeline` prints it)."""
        return [s.describe() for s in self.steps]


def build_pipeline(plan: CompilePlan, *, purpose: Purpose = "train", passes: Sequence[GraphPass] | None = None,
                   user: Sequence[GraphPass] = (), cache_shapes: Mapping[int, list[int]] | None = None) -> Pipeline:
    """The steps for `plan`. `passes`: the fusion list (default `default_passes()`); passes in it that
    graphllm does not define count as user passes, like those in `user`. `cache_shapes`: generation
    under tensor parallelism, the per-rank shapes of the graph's KV-cache inputs (by position)."""
    if purpose not in PURPOSES:
        raise GraphllmError(f"pipeline purpose must be one of {', '.join(PURPOSES)}, got {purpose!r}")
    given = default_passes() if passes is None else list(passes)
    if plan.fused_loss == "off":
        given = [p for p in given if p.name != "fuse_linear_cross_entropy"]
    users = [p for p in given if not _builtin(p)] + list(user)
    first = _cp_position_steps(plan, purpose)  # before the fusions, ahead of any user pass
    model = [_fusion_step(p, plan) for p in given if _builtin(p)] + _generation_steps(purpose, plan, cache_shapes)
    model += _adapter_steps(plan, purpose)
    model += [s for s in _parallel_steps(plan, purpose) if s.name not in {m.name for m in model}]
    model += _quantize_steps(plan, purpose)
    train = _train_steps(plan, purpose)
    disabled = _check_disable(plan.disable, first + model + train, users)
    model = [s for s in model if s.name not in disabled]
    train = [s for s in train if s.name not in disabled]
    users = order_passes([p for p in users if p.name not in disabled])
    fusions_end = sum(1 for s in model if s.stage == "model" and not s.required)
    model = first + _place(model, [p for p in users if p.stage == "model"], fusions_end)
    train = _place(train, [p for p in users if p.stage == "train"], 0)
    steps = model + _lowering_steps(plan) + train + _backend_steps(plan)  # the stages in the order they run
    return Pipeline(plan=plan, purpose=purpose, steps=tuple(steps))


def _builtin(p: GraphPass) -> bool:
    return p.fn.__module__.startswith("graphllm.")


def _fusion_step(p: GraphPass, plan: CompilePlan) -> Step:
    if p.name == "fuse_linear_cross_entropy" and plan.lora.enabled and "exclude" not in p.options:
        # it runs before lora: an LM head the LoRA targets name must stay a linear for lora to adapt it
        p = p.with_options(exclude=tuple(plan.lora.target))
    if p.name == "fuse_linear_cross_entropy" and plan.fused_loss == "on" and "min_bytes" not in p.options:
        p = p.with_options(min_bytes=0)
    return Step(p.name, "model", why_default(p.name) or "a graphllm pass the caller listed, in list order",
                graph_pass=p)


def _generation_steps(purpose: str, plan: CompilePlan, cache_shapes) -> list[Step]:
    if purpose != "generate":
        return []
    from graphllm.passes.pair_rope import pair_rope

    steps = [Step("pair_rope", "model", "after the fusions: pairs the q and k rope ops of each layer (one NPU "
                                        "kernel for inference)", graph_pass=pair_rope)]
    if plan.layout.tp > 1 and cache_shapes:
        from graphllm.passes.tp_cache_inputs import tp_cache_inputs

        steps.append(Step("tp_cache_inputs", "model", "right before tensor_parallel: the cache inputs' per-rank "
                                                      "shapes must be in place when it re-derives head counts",
                          graph_pass=tp_cache_inputs.with_options(shapes=dict(cache_shapes)), required=True))
    return steps


def _adapter_steps(plan: CompilePlan, purpose: str) -> list[Step]:
    if not plan.lora.enabled or (purpose == "reference" and not plan.lora.qlora):
        return []  # the reference of a LoRA plan is the base model: the Parameters the policy's adapters sit on
    from graphllm.passes.lora import lora

    config = replace(plan.lora, dropout=0.0) if purpose == "reference" else plan.lora
    return [Step("lora", "model", "after the fusions, before sharding: each target linear becomes one LoRA op with "
                                  "its base frozen, so tensor_parallel shards base and adapters together",
                 graph_pass=lora.with_options(config=config, seed=plan.seed), required=True)]


def _quantize_steps(plan: CompilePlan, purpose: str) -> list[Step]:
    if not plan.lora.qlora:
        return []
    from graphllm.passes.quantize_base import quantize_base

    steps = [Step("quantize_base", "model", "after lora and sharding: each adapted linear's frozen base → NF4 buffers, "
                                            "dequantised where read (each rank quantises its own shard)",
                  graph_pass=quantize_base, required=True)]
    if purpose == "reference":
        from graphllm.passes.lora import adapters_off

        steps.append(Step("adapters_off", "model", "after quantize_base: the reference is the policy's NF4 base with "
                                                   "the adapters removed (the same rounded weights, no fp32 copy)",
                          graph_pass=adapters_off, required=True))
    return steps


def _cp_position_steps(plan: CompilePlan, purpose: str) -> list[Step]:
    if plan.layout.cp == 1 or purpose == "generate":
        return []
    from graphllm.passes.context_parallel import cp_positions

    return [Step("cp_positions", "model", "first, before the fusions fold RoPE's tables into constants: the "
                                          "positions become this rank's tokens' global ones", graph_pass=cp_positions,
                 required=True)]


def _has_experts(plan: CompilePlan) -> bool:
    """Whether the plan's model has MoE layers (its config only; False when the plan names no loadable config,
    as a Python-API plan may)."""
    from graphllm.models import load_config

    try:
        return getattr(load_config(plan.model), "num_experts", 0) > 0
    except Exception:  # noqa: BLE001 - any unreadable model simply gets no MoE step
        return False


def _parallel_steps(plan: CompilePlan, purpose: str = "train") -> list[Step]:
    from graphllm.passes.coc import coc
    from graphllm.passes.context_parallel import context_parallel
    from graphllm.passes.mc2 import mc2
    from graphllm.passes.sequence_parallel import sequence_parallel
    from graphllm.passes.tensor_parallel import tensor_parallel

    lay, out = plan.layout, []
    if lay.tp > 1:
        tp = tensor_parallel if lay.tp_plan == "graphllm" else tensor_parallel.with_options(plan=lay.tp_plan)
        out.append(Step("tensor_parallel", "model", "after the fusions and user passes: each fused op is "
                                                    "sharded whole, and user passes see the unsharded model",
                        graph_pass=tp, required=True))
    if lay.sequence_parallel:
        out.append(Step("sequence_parallel", "model", "right after tensor_parallel: rewrites the collectives it "
                                                      "inserted at region borders", graph_pass=sequence_parallel,
                        required=True))
    if plan.moe.stats == "on" and purpose == "train" and _has_experts(plan):
        from graphllm.passes.moe_stats import moe_stats

        out.append(Step("moe_stats", "model", "before capacity and expert parallelism rewrite the routing: the "
                                              "graph returns each MoE layer's load balance beside the loss "
                                              "(nothing without MoE layers)",
                        graph_pass=moe_stats.with_options(capacity_factor=plan.moe.capacity_factor,
                                                          bias_counts=plan.moe.bias_update_rate is not None)))
    if plan.moe.capacity_factor is not None and purpose != "generate":
        from graphllm.passes.moe_capacity import moe_capacity

        out.append(Step("moe_capacity", "model", "before expert parallelism: each expert's pairs past its capacity "
                                                 "(counted on this rank's tokens) go to the permutation's tail",
                        graph_pass=moe_capacity.with_options(capacity_factor=plan.moe.capacity_factor),
                        required=True))
    if (lay.ep > 1 or lay.etp > 1) and purpose != "generate":
        from graphllm.passes.expert_parallel import expert_parallel

        out.append(Step("expert_parallel", "model", "after the fusions and user passes: each MoE layer's experts are "
                                                    "shared out over the ep group (and split over tp under --etp), "
                                                    "its tokens sent to them and the outputs back",
                        graph_pass=expert_parallel.with_options(dispatcher=plan.moe.dispatcher,
                                                                capacity_factor=plan.moe.capacity_factor),
                        required=True))
    if lay.cp > 1 and purpose != "generate":
        out.append(Step("context_parallel", "model", f"after tensor/sequence parallelism (attention holds this rank's "
                                                     f"heads): attention across the cp group ({lay.cp_algo}), the "
                                                     "loss weighted by tokens", graph_pass=context_parallel,
                        required=True))
    if lay.mc2:
        out.append(Step("mc2", "model", "after the TP/SP collectives exist: fuses each with its matmul (the CoC "
                                        "chunks are its lowering off the NPU)",
                        graph_pass=mc2.with_options(chunks=lay.coc_parallel_num), required=True))
    elif lay.coc_parallel_num > 1:
        out.append(Step("coc", "model", "after the TP/SP collectives exist: chunks each with its matmul",
                        graph_pass=coc.with_options(chunks=lay.coc_parallel_num), required=True))
    return out


def _lowering_steps(plan: CompilePlan) -> list[Step]:
    from graphllm.backends import lookup_backend
    from graphllm.passes.lower_ops import lower_ops

    be = lookup_backend(plan.backend)
    steps = [Step("lower_ops", "lower", f"after every model pass (they see graphllm ops): ops → the {be.name} "
                                        "backend's lowering table",
                  graph_pass=lower_ops.with_options(lowering=be.lowering), required=True)]
    if plan.layout.pp > 1:
        lay = plan.layout
        steps.append(Step("pipeline_split", "split", "after lowering: splits the whole lowered graph at layer "
                                                     "boundaries into pp×vpp stages and a loss graph",
                          options={"stages": lay.num_stages, "layers": list(lay.pp_layers or []) or "balanced by FLOPs"},
                          origin="graphllm.passes.pipeline_split", required=True))
    steps.append(Step("partition", "partition", "aot_autograd splits each graph into forward and backward; the "
                                                "recompute policy picks what the backward recomputes",
                      options={"recompute": plan.recompute.describe(), **_offload_option(plan)},
                      origin="graphllm.recompute", required=True))
    return steps


def _offload_option(plan: CompilePlan) -> dict[str, str]:
    """The partition step's activation offload (graphllm/offload_activations.py rewrites its result), when on."""
    off = plan.activation_offload
    return {"offload_activations": off.describe()} if off.enabled else {}


def _train_steps(plan: CompilePlan, purpose: str) -> list[Step]:
    from graphllm.backends import lookup_backend

    lay, steps = plan.layout, []
    if purpose == "profile_layers":
        from graphllm.passes.layer_markers import layer_markers

        steps.append(Step("layer_markers", "train", "after user train passes: profiler ranges around each "
                                                    "layer's nodes (profile --by-layer)", graph_pass=layer_markers))
    if lay.grads_reduced_in_graph:
        from graphllm.passes.dp_grad_reduce import dp_grad_reduce

        steps.append(Step("dp_grad_reduce", "train", "on the backward graph, once its gradients exist: bucketed "
                                                     "all-reduces overlap the rest of the backward",
                          graph_pass=dp_grad_reduce, required=True))
    if lay.world_size > 1 and (lookup_backend(plan.backend).lowering != "eager" or lay.coc_parallel_num > 1
                               or lay.cp > 1):
        from graphllm.passes.lower_collectives import lower_collectives

        steps.append(Step("lower_collectives", "train", "last: graphllm collectives → _c10d_functional ones with "
                                                        "waits at first use (async; the overlap of CoC and of "
                                                        "the ring's shifts needs it, even eager)", graph_pass=lower_collectives, required=True))
    return steps


def _backend_steps(plan: CompilePlan) -> list[Step]:
    from graphllm.backends import lookup_backend
    from graphllm.options import to_dict

    be = lookup_backend(plan.backend)
    options: dict[str, Any] = {"amp": plan.amp}
    if be.name == "npu":
        options.update(to_dict(plan.npu))
    return [Step(be.name, "backend", f"compiles each forward/backward graph: {be.description}", options=options,
                 origin="graphllm.backends", required=True)]


def _check_disable(disable: Iterable[str], steps: list[Step], users: list[GraphPass]) -> set[str]:
    disable = set(disable)
    known = {s.name: s for s in steps if s.graph_pass is not None}
    names = list(known) + [p.name for p in users]
    unknown = disable - set(names)
    if unknown:
        raise GraphllmError(f"--disable names unknown pass(es) {', '.join(sorted(unknown))}; passes here: "
                            f"{', '.join(names)}")
    required = sorted(n for n in disable if n in known and known[n].required)
    if required:
        raise GraphllmError(f"--disable {', '.join(required)}: the plan needs it (parallel layout or lowering); "
                            "change the plan instead")
    return disable


def _place(steps: list[Step], users: list[GraphPass], slot: int) -> list[Step]:
    """Insert user passes: each at the stage's user slot (after earlier user passes), moved only as its
    after=/before= constraints demand; built-in steps never move."""
    out = list(steps)
    for p in users:
        index = {s.name: i for i, s in enumerate(out)}
        lo = max((index[a] + 1 for a in p.after if a in index), default=0)
        hi = min((index[b] for b in p.before if b in index), default=len(out))
        if lo > hi:
            raise GraphllmError(f"pass {p.name!r} must run after {', '.join(p.after)} and before "
                                f"{', '.join(p.before)}, but the pipeline runs those the other way round")
        at = min(max(slot, lo), hi)
        out.insert(at, Step(p.name, p.stage, "a user pass: at the end of the user slot, moved by its own "
                                             "after=/before=" if (p.after or p.before) else
                            "a user pass, after the built-in passes before it", graph_pass=p, user=True))
        if at <= slot:
            slot += 1
    return out


# -- user passes: from the command line, and back from a recorded pipeline ------------------------------
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


def recorded_user_passes(described: Sequence[Mapping[str, Any]]) -> list[GraphPass]:
    """The user passes of a recorded pipeline (plan.json), imported again with their options."""
    out = []
    for d in (d for d in described if d.get("user")):
        try:
            module = importlib.import_module(d["origin"])
        except ImportError as e:
            raise GraphllmError(f"pass {d['step']!r} comes from module {d['origin']!r}, which cannot be "
                                f"imported ({e}); put it on PYTHONPATH or recompile without it") from e
        found = [v for v in vars(module).values() if isinstance(v, GraphPass) and v.name == d["step"]]
        if not found:
            raise GraphllmError(f"module {d['origin']!r} no longer defines pass {d['step']!r}; recompile")
        out.append(found[0].with_options(**d.get("options", {})))
    return out
