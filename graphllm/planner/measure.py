"""Per-layer costs read off graphllm's own graphs, captured on fake tensors (no weights are allocated).

For one (tp, cp, sequence-parallel, recompute, micro-batch, seq-len, amp) combination the model is built with
two decoder layers (same widths) as fake CPU tensors (torch's FakeTensorMode: shapes and dtypes, no storage),
captured, passed (the plan's tensor/context-parallel steps) and partitioned by aot_autograd under the plan's
recompute policy; one forward/backward runs on the fake tensors (under CPU bf16 autocast for amp bf16) so that
both graphs exist. Fake CPU tensors rather than the meta device: on meta, aten's cross-entropy loses its backward
(the loss's saved log-probabilities would be missed), and autocast does not apply.

Every node is attributed to the layer its module stack names (`nn_module_stack`; `fwd_nn_module_stack` in the
backward; a saved value: the forward node that made it). The second layer is a middle layer: it holds its input
boundary (the fused residual add + norm that opens it), the first does not (its input is the embedding's). So
"layer" is the second layer, and "rest" the whole less two of it (embedding, final norm, LM head, loss, less the
first layer's missing boundary): rest + L × layer is the L-layer model.

Tensor/context-parallel ranks are traced in this one process on torch's fake process-group backend (no peers).
Each combination is measured once per process, and kept on disk under `cache_dir` when one is given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import re

import torch

from graphllm.planning.comm import graph_collectives
from graphllm.planner.fake_world import fake_world, measurement_plan
from graphllm.planning.flops import node_flops
from graphllm.planner.node_costs import mem_bytes, transient_bytes

CACHE_VERSION = 12  # 12: Key.etp (expert tensor parallelism)
_LAYER = re.compile(r"layers\.(\d+)\b")


@dataclass(frozen=True, slots=True)
class Key:
    """What the graphs of one rank depend on (dp, pp, ZeRO-1 and the micro-batch count do not change them)."""

    tp: int = 1
    cp: int = 1
    sp: bool = False
    recompute: str = "none"
    mbs: int = 1
    seq_len: int = 128
    amp: str = "fp32"
    cp_algo: str = "ring"
    fused_loss: str = "auto"
    attn_implementation: str | None = None
    params_dtype: str = "fp32"
    """bf16: the model's parameters (and so its graph) in bf16 (`--params-dtype bf16`)."""
    min_cut: bool = True
    """Partition recompute policy `none` as inductor does (its min-cut partitioner recomputes cheap pointwise ops
    instead of saving them); False: aot_autograd's default partition (the eager and npu backends save every
    forward value the backward reads)."""
    ep: int = 1
    """Expert-parallel ranks (--ep): the MoE layers hold 1/ep of the experts and move tokens over the group."""
    moe_dispatcher: str = "allgather"
    moe_capacity: float | None = None
    """--moe-dispatcher and --moe-capacity-factor: what the dispatch collectives and the expert buffers are."""
    etp: int = 1
    """Expert tensor-parallel ranks (--etp: 1 or tp): each expert's MLP split over tp, every token routed on every
    tp rank."""


@dataclass(slots=True)
class Part:
    """One micro-batch's costs of a slice of the model on one rank."""

    params: float = 0.0
    """Parameters (elements) this rank holds."""
    expert_params: float = 0.0
    """Of `params`, the routed experts' (their gradients are averaged over the expert-data-parallel group)."""
    fwd_flops: float = 0.0
    """Matmul-class FLOPs of the forward (graphllm.planning.flops; the backward is counted as 2x)."""
    recompute_flops: float = 0.0
    """Matmul-class FLOPs the backward spends recomputing forward ops."""
    mem_bytes: float = 0.0
    """HBM bytes of the non-matmul ops of forward and backward (node_costs.mem_bytes: pointwise chains fused)."""
    saved_bytes: float = 0.0
    """Bytes the forward saves for the backward (graphllm.planning.memory.saved_activation_bytes)."""
    comm: dict[str, float] = field(default_factory=dict)
    """"<group> <collective>" → payload bytes (forward + backward)."""
    peak_comm: float = 0.0
    """The largest single collective payload (a communication buffer held while it runs)."""
    comm_calls: float = 0.0
    """Collective calls (forward + backward): each pays the device's per-call latency, whatever its size."""
    transient: float = 0.0
    """The largest tensor the backward materialises that is not a gradient it returns (e.g. an unfused loss's
    logits gradient): it is made while the saved activations it reads are still alive."""

    def combine(self, other: "Part", a: float = 1.0, b: float = 1.0) -> "Part":
        """a·self + b·other."""
        comm = {k: a * self.comm.get(k, 0.0) + b * other.comm.get(k, 0.0) for k in {*self.comm, *other.comm}}
        return Part(params=a * self.params + b * other.params,
                    expert_params=a * self.expert_params + b * other.expert_params,
                    fwd_flops=a * self.fwd_flops + b * other.fwd_flops,
                    recompute_flops=a * self.recompute_flops + b * other.recompute_flops,
                    mem_bytes=a * self.mem_bytes + b * other.mem_bytes,
                    saved_bytes=a * self.saved_bytes + b * other.saved_bytes,
                    comm={k: max(v, 0.0) for k, v in comm.items()}, peak_comm=max(self.peak_comm, other.peak_comm),
                    comm_calls=max(a * self.comm_calls + b * other.comm_calls, 0.0),
                    transient=max(self.transient if a else 0.0, other.transient if b else 0.0))

    def scaled(self, s: float, *, params: bool = False) -> "Part":
        """Costs of `s` times the rows (parameters and collective calls unchanged, parameters scaled if `params`)."""
        out = self.combine(Part(), s, 0.0)
        out.params = self.params * (s if params else 1.0)
        out.expert_params = self.expert_params * (s if params else 1.0)
        out.peak_comm = self.peak_comm * s
        out.comm_calls = self.comm_calls
        out.transient = self.transient * s
        return out


@dataclass(slots=True)
class Measurement:
    layer: Part
    """One decoder layer."""
    rest: Part
    """Embedding, final norm, LM head and loss."""
    embed_params: float
    """Parameters of the (vocab-parallel) embedding on this rank: on the first pipeline stage."""
    seconds: float = 0.0
    dense_layer: Part | None = None
    """A mixture-of-experts model whose layers mix the two kinds (DeepSeek-V3's first dense layers, Qwen3-MoE's
    mlp_only_layers): one dense decoder layer, `layer` being one MoE layer; None when every layer is `layer`."""


_MEMO: dict[tuple, Measurement] = {}


def measure(cfg, key: Key, *, cache_dir: Path | None = None) -> Measurement:
    """The layer and rest costs of `cfg` (a ModelConfig) under `key`; memoised, and on disk under `cache_dir`."""
    return measure_group(cfg, [key], cache_dir=cache_dir)[key]


def measure_group(cfg, keys: list[Key], *, cache_dir: Path | None = None) -> dict[Key, Measurement]:
    """`measure` for keys that differ only in their recompute policy: one capture, one partition per policy."""
    import time

    out, todo = {}, []
    for key in keys:
        m = _MEMO.get((cfg.fingerprint(), key)) or _load(_cache_path(cache_dir, cfg, key))
        if m is None:
            todo.append(key)
        else:
            out[key] = _MEMO[(cfg.fingerprint(), key)] = m
    if not todo:
        return out
    if len({dataclasses.replace(k, recompute="none") for k in todo}) > 1:
        raise ValueError("measure_group: keys must differ only in their recompute policy")
    t0 = time.perf_counter()
    two = dataclasses.replace(cfg, num_hidden_layers=2, layer_types=cfg.layer_types[:2] if cfg.layer_types else None,
                              mlp_only_layers=tuple(i for i in cfg.mlp_only_layers if i < 2),
                              first_k_dense_replace=min(cfg.first_k_dense_replace, 2))
    dense = {}
    if _mixes_layer_kinds(cfg):  # two MoE layers (`layer`, `rest`), then two dense ones (the dense layer)
        two = dataclasses.replace(two, first_k_dense_replace=0, mlp_only_layers=(), decoder_sparse_step=1)
        fields = {"first_k_dense_replace": 2} if cfg.first_k_dense_replace else {"mlp_only_layers": (0, 1)}
        plain = {k: _without_experts(k) for k in todo}  # ep and the dispatch do not touch a dense layer
        costs = _capture_costs(dataclasses.replace(two, **fields), list(dict.fromkeys(plain.values())))
        dense = {k: costs[plain[k]][0] for k in todo}
    for key, (layer, rest) in _capture_costs(two, todo).items():
        embed = cfg.vocab_size * cfg.hidden_size / key.tp  # graphllm's embedding is vocab-parallel under tp
        m = Measurement(layer=layer, rest=rest, embed_params=embed, seconds=(time.perf_counter() - t0) / len(todo),
                        dense_layer=dense.get(key))
        out[key] = _MEMO[(cfg.fingerprint(), key)] = m
        path = _cache_path(cache_dir, cfg, key)
        if path is not None:
            _store(path, m)
    return out


def _without_experts(key: Key) -> Key:
    return dataclasses.replace(key, ep=1, moe_dispatcher="allgather", moe_capacity=None, etp=1)


def _mixes_layer_kinds(cfg) -> bool:
    kinds = {cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)}
    return len(kinds) == 2


def _store(path: Path, m: Measurement) -> None:
    """Keep `m` in the cache: written beside and renamed (a concurrent `graphllm plan` reads it whole or not at all);
    a cache that cannot be written (full disk, read-only home) is skipped — it only saves time."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(_to_json(m)))
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _load(path: Path | None) -> Measurement | None:
    if path is None or not path.is_file():
        return None
    try:
        return _from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError):
        return None


def _cache_path(cache_dir: Path | None, cfg, key: Key) -> Path | None:
    if cache_dir is None:
        return None
    from graphllm.version import __version__

    blob = json.dumps([CACHE_VERSION, __version__, torch.__version__, cfg.fingerprint(), dataclasses.astuple(key)])
    return Path(cache_dir) / f"{hashlib.sha256(blob.encode()).hexdigest()[:20]}.json"


def _to_json(m: Measurement) -> dict:
    return {"layer": dataclasses.asdict(m.layer), "rest": dataclasses.asdict(m.rest), "embed_params": m.embed_params,
            "seconds": m.seconds, "dense_layer": dataclasses.asdict(m.dense_layer) if m.dense_layer else None}


def _from_json(d: dict) -> Measurement:
    return Measurement(layer=Part(**d["layer"]), rest=Part(**d["rest"]), embed_params=d["embed_params"],
                       seconds=d["seconds"], dense_layer=Part(**d["dense_layer"]) if d.get("dense_layer") else None)


def _capture_costs(cfg, keys: list[Key]) -> dict[Key, tuple[Part, Part]]:
    """Capture and pass the model of `cfg` once on fake tensors, then partition it under each key's recompute
    policy: each key's (decoder layer's, rest's) costs."""
    from graphllm.compile import prepare_graph
    from graphllm.job import set_loss_options
    from graphllm.models.llama import LlamaForCausalLM
    from graphllm.pass_pipeline import build_pipeline
    from graphllm.tasks import graph_inputs

    from torch._subclasses.fake_tensor import FakeTensorMode

    plan = measurement_plan(keys[0])  # the model steps do not read the recompute policy (it acts at partitioning)
    fake = FakeTensorMode(allow_non_fake_inputs=True)  # CPU tensors without storage: nothing is allocated
    out = {}
    with fake_world(plan.layout) as st, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fake, _default_dtype(torch.bfloat16 if keys[0].params_dtype == "bf16" else torch.float32):
            model = LlamaForCausalLM(cfg)  # built in the params dtype: `.to()` cannot swap fake parameters
            set_loss_options(model, plan)
            inputs = graph_inputs(plan)
        prepared = prepare_graph(model, inputs, build_pipeline(plan), groups=st, rank=0)
        for key in keys:
            out[key] = _partitioned_costs(prepared, model, inputs, key, st, fake)
    return out


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def _partitioned_costs(prepared, model, inputs, key: Key, st, fake) -> tuple[Part, Part]:
    """Partition `prepared` under `key`'s recompute policy, run it once on the fake inputs, read the costs."""
    from graphllm.compile import compile_graph
    from graphllm.pass_pipeline import build_pipeline
    from graphllm.train_stage import TrainStage

    plan = measurement_plan(key)
    stage = TrainStage(plan=plan, passes=build_pipeline(plan).train_passes,
                       ctx_template=dataclasses.replace(prepared.ctx, recompute=plan.recompute))
    if key.recompute == "none" and key.min_cut:  # what inductor's compile_fx partitions with (train_stage's rule
        from torch._functorch.partitioners import min_cut_rematerialization_partition  # applies to aot backends)

        stage.partition_fn = lambda: min_cut_rematerialization_partition
    fn = compile_graph(prepared.gm, prepared.backend, stage)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if key.amp == "bf16" else contextlib.nullcontext()
    try:
        with fake, amp:
            loss = fn(*inputs)
            loss = loss[0] if isinstance(loss, (tuple, list)) else loss  # (loss, metrics): MTP, MoE statistics
            (loss if loss.dim() == 0 else loss.sum()).backward()
    finally:
        torch._dynamo.reset()
    kinds = st.kinds_by_name() if st is not None else {}
    fwd, bwd = stage.graphs["forward"], stage.graphs["backward"]
    parts = {True: Part(), False: Part()}  # in the second decoder layer, or not
    for name, p in model.named_parameters():
        part = parts[_LAYER.search(name) is not None and _LAYER.search(name).group(1) == "1"]
        part.params += p.numel()
        part.expert_params += p.numel() if ".experts." in name else 0
    for n in prepared.model_graph.graph.nodes:
        parts[_layer(n)].fwd_flops += node_flops(n)
    _read_train_graphs(fwd, bwd, parts, kinds, reuse=key.min_cut)
    layer = parts[True]
    rest = parts[False].combine(layer, 1.0, -1.0)  # the whole model less two layers (see the module docstring)
    rest.peak_comm = max(parts[False].peak_comm, layer.peak_comm)
    rest.transient = parts[False].transient
    return layer, rest


def _layer(node) -> bool:
    """Whether `node` belongs to the second decoder layer (`layers.1` on its module stack, innermost first)."""
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        m = _LAYER.search(str(path))
        if m:
            return m.group(1) == "1"
    return False


def _saved_in_layer(placeholder, by_name: dict) -> bool:
    """Whether a saved value belongs to the second layer: a backward op of that layer reads it (full recompute
    saves each layer's input, made by the layer before: its reader decides), else the forward op that made it."""
    users = [u for u in placeholder.users if u.op == "call_function"]
    stacks = [u for u in users if u.meta.get("fwd_nn_module_stack") or u.meta.get("nn_module_stack")]
    if stacks:
        return any(_layer(u) for u in stacks)
    return _layer(by_name.get(placeholder.name, placeholder))


def _read_train_graphs(fwd, bwd, parts: dict, kinds: dict, reuse: bool) -> None:
    """Saved activations, recomputed FLOPs, memory-bound bytes, collectives and the backward's transient of the
    partitioned graphs, each added to the part its node belongs to (`reuse`: inductor's buffer reuse)."""
    from graphllm.passes.manager import PASS_META_KEY
    from graphllm.planning.memory import _hint, input_views
    from graphllm.recompute import RECOMPUTE_PASS

    views, by_name = input_views(fwd), {n.name: n for n in fwd.graph.nodes}
    order = {n: i for i, n in enumerate(bwd.graph.nodes)}
    for n in bwd.graph.nodes:  # as graphllm.planning.memory.saved_activation_bytes counts them
        if n.op != "placeholder" or n.name.startswith(("tangents", "primals")) or n.name in views:
            continue
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor):
            parts[_saved_in_layer(n, by_name)].saved_bytes += _hint(v.numel()) * v.element_size()
    for g in (fwd, bwd):
        for n in g.graph.nodes:
            if n.op != "call_function":
                continue
            part = parts[_layer(n)]
            if n.meta.get(PASS_META_KEY) == RECOMPUTE_PASS:
                part.recompute_flops += node_flops(n)
            part.mem_bytes += mem_bytes(n)
            if g is bwd:
                part.transient = max(part.transient, transient_bytes(n, order, reuse))
            for key_, c in _one_collective(n, kinds).items():
                part.comm[key_] = part.comm.get(key_, 0.0) + c["bytes"]
                part.comm_calls += c["calls"]
                part.peak_comm = max(part.peak_comm, float(c["bytes"]))


def _one_collective(n, kinds: dict) -> dict:
    """graphllm.planning.comm.graph_collectives of the one node `n` (a graph holding only it)."""
    from graphllm.ops.collectives import COLLECTIVE_OPS
    from graphllm.ops.mc2 import MC2_OPS
    from graphllm.planning.comm import _C10D, _torchair_kind

    if n.target not in COLLECTIVE_OPS and n.target not in MC2_OPS and n.target not in _C10D and not _torchair_kind(n):
        return {}
    return graph_collectives(_Single(n), kinds)


class _Single:
    """Quacks like a GraphModule whose graph holds one node (what graph_collectives iterates)."""

    def __init__(self, node) -> None:
        self.graph = self
        self.nodes = [node]
