"""`predict(plan, device) -> Prediction`: a plan's memory and step time per rank, from its graphs.

The cost model (docs/planner.md): graphllm.planner.measure gives one decoder layer's and the rest's (embedding,
final norm, head, loss) costs on one rank — parameters, forward FLOPs, recomputed FLOPs, memory-bound bytes,
saved activations and collective bytes per micro-batch — read off the partitioned graphs. `estimate` spreads
them over pipeline ranks (layers per stage balanced by FLOPs, the head on the last stage), multiplies activations
by the 1F1B schedule's in-flight micro-batches (graphllm/report.py rank_memory), takes parameter, gradient and
AdamW bytes from graphllm.planning.optimizer_memory, and reports the peak over the step's phases
(graphllm.planner.memory); time is priced at the device table's rates: matmul FLOPs, memory-bound bytes,
collective bytes and calls (α per call), the optimizer step's bytes, and the pipeline bubble.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from graphllm.planner.devices import DeviceSpec, device_spec
from graphllm.planner.measure import Key, Measurement, Part, measure
from graphllm.planner.memory import rank_memory
from graphllm.planning.optimizer_memory import optimizer_bytes

ACT_BYTES = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryOptions:
    """The memory features a plan may use beyond its layout and recompute policy — the extension point for issue 18
    part 3. Bytes per trainable element follow Megatron's distributed-optimizer accounting: fp32 parameters are
    their own master weights (4 + 4 gradient + 8 AdamW moments); bf16 parameters (`--params-dtype bf16`, O2)
    keep an fp32 master (2 + 2 + 4 + 8); ZeRO-1 keeps master and moments of 1/dp of the elements."""

    params_dtype: str = "fp32"
    offload_optimizer: bool = False
    """Master weights and moments live in host memory between steps: they leave device memory, and cross the host
    link twice a step (DeviceSpec.host_bandwidth)."""
    activation_offload: float = 0.0
    """Fraction of saved activations kept in host memory between forward and backward (not priced in time yet)."""

    @property
    def count(self) -> int:
        """How many features are on (the search prefers fewer between equally fast plans)."""
        return (self.params_dtype != "fp32") + self.offload_optimizer + (self.activation_offload > 0)

    def describe(self) -> str:
        parts = [f"params {self.params_dtype}"] if self.params_dtype != "fp32" else []
        parts += ["optimizer offload"] if self.offload_optimizer else []
        parts += [f"activations {self.activation_offload:.0%} offloaded"] if self.activation_offload else []
        return ", ".join(parts) or "-"


@dataclass(kw_only=True)
class Prediction:
    """What one plan costs, for its worst rank (`rank`) and per pipeline rank (`ranks`).

    `memory`: bytes on the rank with the largest total (`rank`, a global rank: tp = cp = dp index 0 of its
    pipeline rank), keys parameters, gradients, optimizer, activations, buffers, optimizer_step (bytes), total (the
    peak over the step's phases, graphllm.planner.memory) and phase (the phase it falls in: a string).
    `step_seconds`: seconds of one optimizer step, keys compute, communication, bubble, optimizer, total.
    `mfu`: the model's FLOPs of a step (forward + 2 × backward, no recomputation) over world × peak × total.
    `ranks`: per pipeline rank, {"rank", "pp_rank", "layers", "memory", "compute_per_micro_batch"}.
    """

    rank: int
    memory: dict[str, Any]
    step_seconds: dict[str, float]
    mfu: float
    ranks: list[dict[str, Any]] = field(default_factory=list)
    flops_per_step: float = 0.0
    """The model's FLOPs of one optimizer step over all ranks (3 × forward per micro-batch, no recomputation): at
    world 1 with one micro-batch, the compile report's flops_per_step."""
    device: str = ""
    dominant: str = ""
    """What is largest in `memory` (parameters, gradients, optimizer, activations or buffers)."""


def predict(plan, device: str = "cpu", *, device_spec: DeviceSpec | None = None,
            options: MemoryOptions | None = None, model_config=None, cache_dir=None) -> Prediction:
    """Predict `plan`'s (a graphllm.plan.CompilePlan) per-rank memory and step time on `device`.

    `device`: a key of graphllm.planner.devices.DEVICES ("a2", "a3", "h100", "h200") or "cpu" (probed here);
    `device_spec` (a graphllm.planner.devices.DeviceSpec) overrides it. The model is captured on fake
    CPU tensors (no weights are allocated) at the plan's micro-batch × seq-len; see docs/planner.md. Tensor/
    context-parallel plans are traced on torch's fake process group: call this outside an initialised process
    group.
    Returns the worst rank's figures (`Prediction.rank` says which) and every pipeline rank's in `ranks`.
    `model_config` (a ModelConfig) replaces the plan's model (e.g. graphllm.planner.models' config-only presets);
    `options` the memory features (default: the plan's --params-dtype and --offload-optimizer where the plan
    has them, else fp32 parameters and AdamW on the device); `cache_dir` keeps the
    graph measurements on disk.
    """
    from graphllm.models import load_config

    spec = device_spec if device_spec is not None else _spec(device)
    cfg = model_config if model_config is not None else load_config(plan.model)
    if plan.attn_implementation is not None:
        cfg = dataclasses.replace(cfg, attn_implementation=plan.attn_implementation)
    if plan.mtp.layers:  # the modules are captured with the model: their costs fall in `rest` (the last stage's)
        cfg = dataclasses.replace(cfg, mtp_layers=plan.mtp.layers)
    layout = plan.layout
    if options is None:  # the plan's own memory features, where this graphllm has them
        options = MemoryOptions(params_dtype=getattr(plan, "params_dtype", "fp32"),
                                offload_optimizer=getattr(plan, "offload_optimizer", False))
    key = Key(tp=layout.tp, cp=layout.cp, sp=layout.sequence_parallel, recompute=plan.recompute.policy,
              mbs=plan.batch_size, seq_len=plan.seq_len, amp=plan.amp, cp_algo=layout.cp_algo,
              fused_loss=plan.fused_loss, attn_implementation=plan.attn_implementation,
              params_dtype=options.params_dtype, min_cut=plan.backend == "inductor", ep=layout.ep,
              moe_dispatcher=plan.moe.dispatcher, moe_capacity=plan.moe.capacity_factor, etp=layout.etp)
    m = measure(cfg, key, cache_dir=cache_dir)
    return estimate(cfg, layout, m, spec, mbs=plan.batch_size, seq_len=plan.seq_len, amp=plan.amp, options=options)


def _spec(device: str) -> DeviceSpec:
    """The table's entry (predict's `device_spec` argument hides the function's name)."""
    return device_spec(device)


def estimate(cfg, layout, m: Measurement, spec: DeviceSpec, *, mbs: int, seq_len: int, amp: str,
             scale: float = 1.0, options: MemoryOptions | None = None) -> Prediction:
    """The prediction of `layout` from a measurement `m` taken at `mbs / scale` rows per micro-batch (the search
    measures one row and scales: FLOPs, bytes and collectives of a static graph grow with its rows)."""
    opts = options or MemoryOptions()
    layer, rest = m.layer.scaled(scale), m.rest.scaled(scale)
    counts = stage_layers(cfg.num_hidden_layers, layout.num_stages, layer.fwd_flops, rest.fwd_flops)
    mb = layout.micro_batches
    boundary = mbs * (seq_len // layout.cp) * cfg.hidden_size * ACT_BYTES[amp]
    if layout.sequence_parallel:
        boundary //= layout.tp
    # Under a pipeline the loss is its own graph: the last stage holds its output (the logits, the loss graph's
    # input) and the logits' gradient that graph's backward hands back; the whole-model graph that `m` measured
    # fuses the loss and materialises neither next to its saved activations.
    logits = mbs * (seq_len // layout.cp) * cfg.vocab_size / layout.tp * ACT_BYTES[amp]
    ranks = []
    dense = m.dense_layer.scaled(scale) if m.dense_layer is not None else None
    for r in range(layout.pp):
        stages = layout.stages_of(r)
        n = sum(counts[s] for s in stages)
        n_dense = _dense_layers(cfg, counts, stages) if dense is not None else 0
        part = layer.combine(rest, n - n_dense, 1.0 if layout.num_stages - 1 in stages else 0.0)
        params = (n - n_dense) * layer.params + (m.embed_params if 0 in stages else 0.0)
        if n_dense:
            part = part.combine(dense, 1.0, n_dense)
            params += n_dense * dense.params
        experts = (n - n_dense) * layer.expert_params
        if layout.num_stages - 1 in stages:
            params += rest.params - m.embed_params
            experts += rest.expert_params
        in_flight = 1 if layout.pp == 1 else min(mb, (layout.pp - r) * layout.vpp)
        last = layout.num_stages - 1 in stages
        largest = max(cfg.intermediate_size * cfg.hidden_size / layout.tp,
                      m.embed_params if 0 in stages or last else 0.0)
        held = 0.0 if layout.pp == 1 else (2 * logits if last else 0.0) + boundary * in_flight
        mem = _memory(params, largest, part, in_flight, layout, opts, spec, held, 2 * boundary if layout.pp > 1 else 0)
        ranks.append({"rank": layout.rank_of(_coords(r)), "pp_rank": r, "layers": n, "memory": mem,
                      "params": params, "expert_params": experts, "part": part,
                      "compute_per_micro_batch": _compute_seconds(part, spec),
                      "comm_per_micro_batch": _ingraph_comm_seconds(part, layout, spec)})
    worst = max(ranks, key=lambda x: x["memory"]["total"])
    t_compute = max(x["compute_per_micro_batch"] for x in ranks)
    t_comm = max(x["comm_per_micro_batch"] for x in ranks)
    dp_comm = max(_dp_comm_seconds(x["params"], layout, spec, opts, experts=x["expert_params"]) for x in ranks)
    sends = 2 * mb * layout.vpp  # each micro-batch crosses each of a rank's stage boundaries forward and back
    pp_comm = sends * (boundary / _bandwidth("pp", layout, spec) + spec.collective_latency) if layout.pp > 1 else 0.0
    step = {"compute": mb * t_compute, "communication": mb * t_comm + dp_comm + pp_comm,
            "bubble": (layout.pp - 1) / layout.vpp * (t_compute + t_comm),
            "optimizer": max(_optimizer_seconds(x["params"], layout, spec, opts) for x in ranks)}
    step["total"] = sum(step.values())
    n_dense = _dense_layers(cfg, [cfg.num_hidden_layers], [0]) if dense is not None else 0
    layer_flops = (cfg.num_hidden_layers - n_dense) * layer.fwd_flops + n_dense * (dense.fwd_flops if dense else 0.0)
    per_micro = 3 * (layer_flops + rest.fwd_flops) * layout.tp * layout.cp
    flops = per_micro * mb * layout.dp
    mfu = flops / (layout.world_size * spec.peak_flops * step["total"]) if step["total"] else 0.0
    for x in ranks:
        del x["part"]
    mem = worst["memory"]
    dominant = max(("parameters", "gradients", "optimizer", "activations", "buffers"), key=lambda k: mem[k])
    return Prediction(rank=worst["rank"], memory=mem, step_seconds=step, mfu=mfu, ranks=ranks, flops_per_step=flops,
                      device=spec.name, dominant=dominant)


def _dense_layers(cfg, counts: list[int], stages) -> int:
    """How many of the decoder layers of `stages` (contiguous runs of `counts` layers per stage) have no experts."""
    starts = [sum(counts[:s]) for s in range(len(counts))]
    return sum(not cfg.is_moe_layer(i) for s in stages for i in range(starts[s], starts[s] + counts[s]))


def _coords(pp_rank: int):
    from graphllm.planning.layout import Coords

    return Coords(pp=pp_rank, dp=0, tp=0, cp=0)


def _memory(params: float, largest: float, part: Part, in_flight: int, layout, opts: MemoryOptions,
            spec: DeviceSpec, held_outputs: float, pp_buffers: float) -> dict:
    """The rank's memory phases (graphllm.planner.memory): `held_outputs` are the bytes of pipeline stage outputs
    a rank keeps for their backward (the boundary activations; on the last stage the logits and their gradient),
    `pp_buffers` its pipeline send and receive buffers."""
    acts = part.saved_bytes * in_flight * (1.0 - opts.activation_offload) + held_outputs
    return rank_memory(params, largest, acts, part.peak_comm + pp_buffers, layout,
                       params_dtype=opts.params_dtype, offload=opts.offload_optimizer,
                       gather_copies=spec.gather_copies, accumulates=layout.micro_batches > 1,
                       transient=part.transient)


def _compute_seconds(part: Part, spec: DeviceSpec) -> float:
    """One micro-batch's forward + backward on one rank: matmul FLOPs (backward 2×, plus what it recomputes) at
    the device's peak × its efficiency ceiling, and the other ops' bytes at its memory bandwidth."""
    flops = 3 * part.fwd_flops + part.recompute_flops
    return flops / (spec.peak_flops * spec.mfu_ceiling) + part.mem_bytes / spec.hbm_bandwidth


STRIDE_OF = {"tp": lambda lay: 1, "cp": lambda lay: lay.tp, "cp_ring": lambda lay: lay.tp * lay.ulysses_size,
             "cp_ulysses": lambda lay: lay.tp, "dp": lambda lay: lay.tp * lay.cp, "dp_cp": lambda lay: lay.tp,
             "pp": lambda lay: lay.tp * lay.cp * lay.dp, "ep": lambda lay: lay.tp * lay.cp,
             "edp": lambda lay: lay.tp * lay.cp * lay.ep, "edp_cp": lambda lay: lay.tp}
"""Distance between neighbouring ranks of each group kind (Megatron's tp-cp-dp-pp order, planning/layout.py)."""


def _bandwidth(kind: str, layout, spec: DeviceSpec) -> float:
    """Bytes/s of a group of `kind`: the node's links when the whole group sits inside one node."""
    kind = kind.split("/")[0]
    size = layout.group_size(kind) if kind != "pp" else layout.pp
    span = STRIDE_OF.get(kind, STRIDE_OF["dp"])(layout) * size
    inside = span <= spec.devices_per_node
    return (spec.intra_node_bandwidth if inside else spec.inter_node_bandwidth) * spec.link_efficiency


def collective_seconds(name: str, nbytes: float, layout, spec: DeviceSpec) -> float:
    """Ring-algorithm time of "<group> <collective>" moving `nbytes` of payload."""
    kind, _, op = name.partition(" ")
    base = kind.split("/")[0]
    try:
        n = layout.group_size(base)
    except Exception:  # noqa: BLE001 (an unknown kind: priced as one hop)
        n = 2
    if n <= 1 or nbytes <= 0:
        return 0.0
    factor = 2 * (n - 1) / n if "all_reduce" in op else (n - 1) / n
    return factor * nbytes / _bandwidth(base, layout, spec)


def _ingraph_comm_seconds(part: Part, layout, spec: DeviceSpec) -> float:
    """The graphs' collectives: their bytes at the group's bandwidth, and each call's latency."""
    return sum(collective_seconds(k, v, layout, spec) for k, v in part.comm.items()) \
        + part.comm_calls * spec.collective_latency


GRAD_BUCKET_BYTES = 25 * 2**20
"""Bytes per data-parallel gradient all-reduce call (graphllm.parallel.optim.reduce_gradients' default bucket)."""


def _optimizer_seconds(params: float, layout, spec: DeviceSpec, opts: MemoryOptions) -> float:
    """AdamW's step is memory-bound: the elements this rank updates have their parameter, gradient, moments (and
    fp32 master) read and parameter, moments (and master) written, at the device's memory bandwidth. With the
    optimizer offloaded (graphllm.parallel.offload) the same update runs on the device, chunk by chunk, and the
    masters and moments cross the host link there and back, not overlapped (the copies share the compute stream)."""
    ob = optimizer_bytes(int(params), opts.params_dtype, zero1=layout.zero1, dp=layout.dp)
    share = ob["moment_bytes"] / (optimizer_bytes(int(params))["moment_bytes"] or 1)  # 1/dp under ZeRO-1
    touched = (2 * ob["parameter_bytes"] + ob["gradient_bytes"]) * share + 2 * ob["optimizer_bytes"]
    streamed = 2 * ob["optimizer_bytes"] / spec.host_bandwidth if opts.offload_optimizer else 0.0
    return touched / spec.hbm_bandwidth + streamed


def _dp_comm_seconds(params: float, layout, spec: DeviceSpec, opts: MemoryOptions, *, experts: float = 0.0) -> float:
    """Gradient averaging (in fp32, bf16 gradients too) over the parameters' replicas after the step's
    micro-batches, and ZeRO-1's all-gather of the updated parameters (graphllm/report.py rank_communication).
    `experts` of the `params` are averaged over the expert-data-parallel group instead (dp / ep replicas), after
    a sum over tp when each tp rank routed 1/tp of the tokens to whole expert shards (--etp 1 without sequence
    parallelism: graphllm/parallel/optim.py reduce_replicas)."""
    t = 0.0
    if layout.ep > 1 and experts:
        reduce = optimizer_bytes(int(experts), opts.params_dtype)["gradient_reduce_bytes"]
        calls = math.ceil(reduce / GRAD_BUCKET_BYTES)
        if layout.group_size(layout.expert_grad_kind) > 1:
            t = collective_seconds(f"{layout.expert_grad_kind} all_reduce", reduce, layout, spec) \
                + calls * spec.collective_latency
        if layout.tp > 1 and layout.etp == 1 and not layout.sequence_parallel:
            t += collective_seconds("tp all_reduce", reduce, layout, spec) + calls * spec.collective_latency
        params -= experts
    ob = optimizer_bytes(int(params), opts.params_dtype, zero1=True, dp=layout.dp)
    if layout.group_size(layout.grad_kind.split("/")[0]) <= 1:
        return t
    calls = math.ceil(ob["gradient_reduce_bytes"] / GRAD_BUCKET_BYTES)
    t += collective_seconds(f"{layout.grad_kind} all_reduce", ob["gradient_reduce_bytes"], layout, spec)
    if layout.zero1:
        t += collective_seconds("dp all_gather", ob["parameter_gather_bytes"], layout, spec)
        calls += 1
    return t + calls * spec.collective_latency


def stage_layers(layers: int, stages: int, layer_cost: float, head_cost: float) -> list[int]:
    """Decoder layers per pipeline stage: contiguous, ≥ 1 each, the largest stage cost smallest with the head on
    the last stage (what passes/pipeline_split.py's FLOP balance does, for equal layers)."""
    return list(_stage_layers(layers, stages, round(head_cost / layer_cost, 2) if layer_cost else 0.0))


@lru_cache(maxsize=4096)
def _stage_layers(layers: int, stages: int, head: float) -> tuple[int, ...]:
    if stages <= 1:
        return (layers,)
    best = None
    for last in range(1, layers - stages + 2):
        others = layers - last
        cost = max(-(-others // (stages - 1)), last + head)
        if best is None or cost < best[0]:
            best = (cost, last)
    last = best[1]
    q, extra = divmod(layers - last, stages - 1)
    return tuple([q + 1] * extra + [q] * (stages - 1 - extra) + [last])
