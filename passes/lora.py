"""lora: give each target linear a low-rank adapter and freeze the base model (Hu et al. 2021, PEFT's layout).

For every `aten.linear(x, W, bias)` whose weight's module path matches one of `config.target` (LoraConfig: a
pattern matches a path's last component or a dotted suffix; fnmatch wildcards allowed):

    linear(x, W, bias)  ->  graphllm.lora_linear(x, W, bias, A, B, s, p, mask)

with two new Parameters set on the graph at `<module path>.lora_A` [r, in] and `<module path>.lora_B` [out, r]
(so `graphllm.compile.adopt_parameters` gives them to the model, and the optimizer and checkpoints see them
under PEFT's names), s = config.scale. Every other parameter of the model is frozen (requires_grad False, as
PEFT's `mark_only_lora_as_trainable`): no gradient, no optimizer state, no gradient all-reduce.

Legal because B starts at zero: the adapted graph computes the same loss as before, bit for bit (x Wᵀ + 0), and
only A and B train. A is kaiming-uniform as PEFT draws it (bound 1/√in), from a generator seeded by the plan's
seed and the module path (crc32), never from the global RNG: every rank, and every rebuild of an artifact by
`graphllm run`, draws the same A for the same layer whatever the order or the layout. Dropout p > 0 adds one
`rand_like(x) >= p` keep-mask per adapter (see ops/lora.py).

Refused: targets matching no linear (the error lists the model's linear layers), a rank larger than a target's
smaller dimension. Linears whose weight is not a Parameter read directly (a cast or a computed weight) are
left alone.
"""

from __future__ import annotations

import fnmatch
import math
import re
import zlib

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from graphllm.errors import GraphllmError
from graphllm.ops.lora import lora_linear
from graphllm.passes.graph_edit import PROVENANCE_KEYS, get_attr_value, set_parameter
from graphllm.passes.manager import PassContext, graph_pass
from graphllm.passes.matching import aten, calls_to, is_call, replace_with_call
from graphllm.planning.lora_config import LoraConfig

LORA_A, LORA_B = "lora_A", "lora_B"
"""Attribute names of the adapter factors on their module (PEFT's, so names map one to one)."""
_LAYER_INDEX = re.compile(r"\.\d+\.")


def module_path(weight_target: str) -> str:
    """`model.layers.0.self_attn.q_proj.weight` -> `model.layers.0.self_attn.q_proj`."""
    return weight_target.rsplit(".", 1)[0] if weight_target.endswith(".weight") else weight_target


def matches(path: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """Does a module path match a target pattern: its last component or a dotted suffix, fnmatch-style."""
    parts = path.split(".")
    suffixes = [".".join(parts[i:]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(s, pat) for pat in patterns for s in suffixes)


def adapter_seed(seed: int, path: str) -> int:
    """The generator seed of one module's A: the plan's seed and the module path, stable across processes."""
    return (seed * 1_000_003 + zlib.crc32(path.encode())) % (2**63)


def init_lora_a(shape: tuple[int, int], seed: int, path: str) -> torch.Tensor:
    """PEFT's `kaiming_uniform_(A, a=√5)` (uniform in ±1/√in), drawn from this module's own generator."""
    a = torch.empty(shape, dtype=torch.float32)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=torch.Generator().manual_seed(adapter_seed(seed, path)))
    return a


def _adaptable(gm: fx.GraphModule) -> list[fx.Node]:
    """Linears whose weight is a Parameter read directly (what an adapter can be attached to)."""
    return [n for n in calls_to(gm, aten.linear.default) if isinstance(n.args[1], fx.Node)
            and n.args[1].op == "get_attr" and isinstance(get_attr_value(gm, n.args[1].target), torch.nn.Parameter)]


def _check(linears: list[fx.Node], chosen: list[fx.Node], config: LoraConfig) -> None:
    if not chosen:
        names = sorted({_LAYER_INDEX.sub(".*.", module_path(n.args[1].target)) for n in linears})
        raise GraphllmError(f"--lora-target {','.join(config.target)} matches none of the model's linear layers "
                            f"({', '.join(names) or 'none'}); name some of them")
    for n in chosen:
        out_f, in_f = n.args[1].meta["val"].shape
        if config.rank > min(out_f, in_f):
            raise GraphllmError(f"--lora-rank {config.rank} is larger than {module_path(n.args[1].target)}'s "
                                f"{in_f}→{out_f} features; use a rank of at most {min(out_f, in_f)}")


def _new_param(gm: fx.GraphModule, like: fx.Node, target: str, value: torch.Tensor, mode) -> fx.Node:
    """Register `value` as a trainable Parameter at `target` and read it with a get_attr before `like`."""
    set_parameter(gm, target, torch.nn.Parameter(value, requires_grad=True))
    with gm.graph.inserting_before(like):
        node = gm.graph.get_attr(target)
    node.meta["val"] = mode.from_tensor(get_attr_value(gm, target), static_shapes=True)
    for key in PROVENANCE_KEYS:
        if key in like.meta:
            node.meta[key] = like.meta[key]
    return node


def _keep_mask(gm: fx.GraphModule, lin: fx.Node, p: float, mode) -> fx.Node:
    """`rand_like(x, fp32) >= p`: the adapter's dropout keep-mask, an ordinary random op of the graph."""
    x = lin.args[0]
    with gm.graph.inserting_before(lin):
        r = gm.graph.call_function(aten.rand_like.default, (x,), {"dtype": torch.float32})
        keep = gm.graph.call_function(aten.ge.Scalar, (r, p))
    with mode:
        r.meta["val"] = torch.rand_like(x.meta["val"], dtype=torch.float32)
        keep.meta["val"] = r.meta["val"] >= p
    for node in (r, keep):
        for key in PROVENANCE_KEYS:
            if key in lin.meta:
                node.meta[key] = lin.meta[key]
    return keep


@graph_pass("lora")
def lora(gm: fx.GraphModule, ctx: PassContext, *, config: LoraConfig, seed: int = 0) -> fx.GraphModule:
    """`config`: the plan's lora section (rank 0: nothing to do); `seed`: the plan's seed (A's initialisation)."""
    if not config.enabled:
        return gm
    linears = _adaptable(gm)
    chosen = [n for n in linears if matches(module_path(n.args[1].target), config.target)]
    _check(linears, chosen, config)
    mode = detect_fake_mode([n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)])
    frozen = 0
    for p in gm.parameters():
        frozen += int(p.requires_grad)
        p.requires_grad_(False)
    factors: dict[str, tuple[fx.Node, fx.Node]] = {}  # module path -> (A, B): a weight used twice shares them
    for lin in chosen:
        weight = lin.args[1]
        path = module_path(weight.target)
        w = get_attr_value(gm, weight.target)
        if path not in factors:
            out_f, in_f = w.shape
            a = init_lora_a((config.rank, in_f), seed, path).to(device=w.device, dtype=w.dtype)
            b = torch.zeros((out_f, config.rank), device=w.device, dtype=w.dtype)
            factors[path] = (_new_param(gm, lin, f"{path}.{LORA_A}", a, mode),
                             _new_param(gm, lin, f"{path}.{LORA_B}", b, mode))
        a_node, b_node = factors[path]
        bias = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
        mask = _keep_mask(gm, lin, config.dropout, mode) if config.dropout > 0 else None
        replace_with_call(gm, lin, lora_linear._opoverload,
                          (lin.args[0], weight, bias, a_node, b_node, config.scale, config.dropout, mask))
    ctx.count("adapted linears", len(chosen))
    ctx.count("frozen parameters", frozen)
    ctx.logger.info("lora: %d linears adapted (rank %d, scale %g), %d parameters frozen", len(chosen), config.rank,
                    config.scale, frozen)
    gm.recompile()
    return gm


def adapted(gm: fx.GraphModule) -> list[fx.Node]:
    """The graph's lora_linear calls (for passes and tests that look for them)."""
    return [n for n in gm.graph.nodes if is_call(n, lora_linear._opoverload)]


@graph_pass("adapters_off", stage="model", after=("lora",))
def adapters_off(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Each lora_linear back to its base `aten.linear(x, W, bias)`, the adapter factors deleted: the adapted
    graph's base model. DPO's reference under QLoRA runs lora, tensor_parallel and quantize_base like the policy
    and then this, so it reads the policy's own NF4 base (the same rounded weights, no full-precision copy).
    Legal: the policy starts with B = 0, where its lora_linear equals this linear bit for bit (x Wᵀ + 0)."""
    ops = adapted(gm)
    for n in ops:
        bias = n.args[2]
        replace_with_call(gm, n, aten.linear.default, (n.args[0], n.args[1], bias))
    gm.graph.eliminate_dead_code()
    factors = [name for name, _ in gm.named_parameters() if name.rsplit(".", 1)[-1] in (LORA_A, LORA_B)]
    for name in factors:
        owner_name, _, attr = name.rpartition(".")
        delattr(gm.get_submodule(owner_name) if owner_name else gm, attr)
    ctx.count("adapters removed", len(ops))
    gm.graph.lint()
    gm.recompile()
    return gm
