"""QLoRA: NF4 storage (ops/nf4.py) and the `quantize_base` pass (passes/quantize_base.py) on tiny-llama.

Format: the code book is the paper's construction; codes and scales equal bitsandbytes' (the reference
implementation, CPU) bit for bit, and so does dequantising the same buffers. Pass: structure (one dequantise node
per adapted linear, the Parameter gone, 0.52 byte a base weight), numerics (a QLoRA step equals a LoRA step on the
dequantised weights: bitwise on eager), the dequantised weights are never saved for the backward (eager fp32/bf16,
inductor, and the npu path's decomposition under default_partition), cases where it must not fire, and checkpoints
that hold the adapters but not the base.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy

from graphllm.models import load_model
from graphllm.ops.nf4 import (NF4_BLOCK, NF4_CODE, NF4Weight, code_pairs, dynamic_map, nf4_dequantize,
                              nf4_dequantize_decomposed, nf4_dequantize_recomputed, quantize_nf4)
from graphllm.pass_pipeline import build_pipeline
from graphllm.plan import CompilePlan
from graphllm.planning.lora_config import DEFAULT_TARGETS, LoraConfig
from graphllm.passes.lora import matches, module_path

SEQ, RANK = 32, 4
REPRO = "reproduce: python -m pytest -q tests/test_qlora.py -k "
CODE_BOOK_ATOL = 1e-6
"""bitsandbytes built NF4's table from quantile points on an fp32 linspace (spacing error ~3e-8) pushed through the
normal quantile function (slope up to ~14 at 0.968) and normalised in fp32; measured worst 2.4e-7."""
BYTES_PER_PARAM = 0.6
"""The brief: QLoRA's 4.127 bits a weight (0.516 byte) plus what graphllm stores besides (4 bytes of offset)."""
NF4_LOSS_DRIFT = 1e-3
"""tiny-llama at init, every decoder linear in NF4: the loss moves 1.7e-4 relative (NF4's RMS error is ~8% of a
weight's spread, averaged over 256-wide dot products); a wrong code order or scale moves it by O(1)."""
gops = torch.ops.graphllm


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# -- the format ----------------------------------------------------------------------------------------------
def test_code_book_is_the_papers_normal_float():
    """QLoRA App. E: 8 quantiles of N(0,1) on [0.5, 0.9677083], 7 mirrored, an exact 0, scaled to [-1, 1]."""
    ppf = torch.special.ndtri
    pos = ppf(torch.linspace(0.9677083, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -ppf(torch.linspace(0.9677083, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    levels /= levels.max()
    code = torch.tensor(NF4_CODE, dtype=torch.float64)
    assert (code - levels).abs().max() <= CODE_BOOK_ATOL
    # not equally spaced: no int4 (q + offset)·scale kernel can hold it (docs/qlora.md, the NPU lowering)
    gaps = code.diff()
    assert gaps.max() / gaps.min() > 3


@pytest.mark.parametrize("shape, dtype", [((256, 704), torch.float32), ((300, 64), torch.float32),
                                          ((33, 7), torch.float32), ((128, 96), torch.bfloat16)])
def test_quantize_equals_bitsandbytes(shape, dtype):
    """Codes, offset and group scales bitwise; 8-bit block scales bitwise against bitsandbytes' PyTorch kernel.
    Its CPU C++ kernel (a faster approximate search) picks the farther of two neighbours on near ties: those
    entries are one step apart, and ours is the nearer."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    w = _randn(*shape, seed=sum(shape), dtype=dtype) * 0.05
    ours = quantize_nf4(w)
    packed, state = bnb.quantize_4bit(w, blocksize=NF4_BLOCK, quant_type="nf4", compress_statistics=True)
    n = (w.numel() + 1) // 2
    assert torch.equal(ours.codes[:n], packed.view(-1)), f"{REPRO}quantize_equals"
    assert torch.equal(ours.offset, state.offset.reshape(1)) and torch.equal(ours.scales2, state.state2.absmax)
    absmax = bnb.quantize_4bit(w, blocksize=NF4_BLOCK, quant_type="nf4")[1].absmax
    qmap = bnb.create_dynamic_map()
    torch_kernel = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
        torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd), absmax - state.offset, qmap, 256)
    assert torch.equal(ours.qscales, torch_kernel[0])
    differ = (ours.qscales != state.absmax).nonzero().view(-1)
    assert differ.numel() <= max(1, absmax.numel() // 50), differ
    centred = (absmax - state.offset)[differ] / ours.scales2[differ // 256]
    mine, theirs = qmap[ours.qscales[differ].long()], qmap[state.absmax[differ].long()]
    assert ((ours.qscales[differ].int() - state.absmax[differ].int()).abs() == 1).all()
    assert ((centred - mine).abs() <= (centred - theirs).abs()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_equals_bitsandbytes(dtype):
    """The same buffers dequantise to bitsandbytes' values bit for bit (code · (qmap[q]·s2 + offset), in fp32)."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    w = _randn(704, 256, seed=3, dtype=dtype) * 0.05
    packed, state = bnb.quantize_4bit(w, blocksize=NF4_BLOCK, quant_type="nf4", compress_statistics=True)
    theirs = NF4Weight(packed.view(-1), state.absmax, state.state2.absmax, state.offset.reshape(1), tuple(w.shape),
                       dtype)
    assert torch.equal(theirs.dequantize(), bnb.dequantize_4bit(packed, state)), f"{REPRO}dequantize_equals"


def test_op_kernel_decomposition_and_lowering_agree_and_store_0_52_bytes():
    q = quantize_nf4(_randn(704, 256, seed=4) * 0.02)
    args = (q.codes, q.qscales, q.scales2, q.offset, code_pairs(), dynamic_map(), list(q.shape), q.dtype)
    torch.library.opcheck(gops.nf4_dequantize.default, args)
    got = nf4_dequantize(*args)
    assert torch.equal(got, nf4_dequantize_decomposed(*args)) and torch.equal(got, nf4_dequantize_recomputed(*args))
    # inductor's kernel for the decomposition too: it keeps the multiply and the add apart (no fma), as the op does
    assert torch.equal(torch.compile(nf4_dequantize_decomposed, fullgraph=True)(*args), got)
    assert got.shape == (704, 256) and got.dtype == torch.float32
    assert q.nbytes / got.numel() <= BYTES_PER_PARAM
    assert q.nbytes == got.numel() // 2 + got.numel() // NF4_BLOCK + 4 * 11 + 4  # codes, qscales, 11 groups, offset


# -- the pass on tiny-llama ------------------------------------------------------------------------------------
def _pipeline(plan: CompilePlan):
    """The plan's pipeline (lora, then quantize_base after the parallel steps)."""
    pipeline = build_pipeline(plan)
    assert "quantize_base" in [s.name for s in pipeline.steps] or not plan.lora.qlora
    return pipeline


def _dequantize_targets_in_place(model) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and matches(module_path(name), DEFAULT_TARGETS):
                p.copy_(quantize_nf4(p).dequantize())


def _step(qlora: bool, *, dequantized: bool = False, backend: str = "eager", amp: str = "fp32"):
    """One forward/backward of tiny-llama with rank-4 adapters on every decoder linear, B set to seeded values
    (so the adapters contribute); returns the compiled model, loss and adapter gradients."""
    from graphllm.compile import compile_pipeline

    model = load_model("tiny-llama", seed=0)
    if dequantized:
        _dequantize_targets_in_place(model)
    ids = (_randn(2, SEQ, seed=1).abs() * 1000).long()
    plan = CompilePlan(model="tiny-llama", batch_size=2, seq_len=SEQ, backend=backend, amp=amp,
                       lora=LoraConfig(rank=RANK, qlora=qlora))
    compiled = compile_pipeline(model, (ids, ids), _pipeline(plan))
    params = dict(compiled.result.model_graph.named_parameters())
    with torch.no_grad():
        for i, name in enumerate(sorted(n for n in params if n.endswith(".lora_B"))):
            params[name].copy_(_randn(*params[name].shape, seed=100 + i) * 0.02)
    loss = compiled(ids, ids)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in params.items() if ".lora_" in n}
    return compiled, loss.detach(), grads


@pytest.fixture(scope="module")
def eager_runs():
    return {"qlora": _step(True), "lora_dequantized": _step(False, dequantized=True), "lora": _step(False)}


def test_structure_one_dequantise_per_adapted_linear(eager_runs):
    compiled = eager_runs["qlora"][0]
    gm = compiled.result.model_graph
    ops = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is gops.lora_linear.default]
    assert len(ops) == len(DEFAULT_TARGETS) * 4
    for op in ops:
        deq = op.args[1]
        assert deq.target is gops.nf4_dequantize.default, f"{op.name} reads {deq}"
        assert deq.meta["recompute"] == CheckpointPolicy.MUST_RECOMPUTE
    base = [n for n, _ in gm.named_parameters() if matches(module_path(n), DEFAULT_TARGETS) and ".lora_" not in n]
    assert base == [], base
    quantized = [n for n, b in gm.named_buffers() if n.endswith("_nf4_codes")]
    assert len(quantized) == len(ops)
    stored = sum(b.nbytes for n, b in gm.named_buffers() if "_nf4_" in n)
    params = sum(op.args[1].meta["val"].numel() for op in ops)
    assert stored / params <= BYTES_PER_PARAM, stored / params
    record = next(r for r in compiled.result.records if r.name == "quantize_base")
    assert record.counters["quantized weights"] == len(ops)
    assert next(s for s in compiled.result.pipeline.steps if s.name == "quantize_base").graph_pass.changes_numerics


def test_qlora_step_equals_lora_on_dequantised_weights(eager_runs):
    """Eager: the lora op receives the same weight values, so loss and adapter gradients are bitwise equal; the
    quantisation itself moves the loss a little (NF4_LOSS_DRIFT)."""
    _, loss, grads = eager_runs["qlora"]
    _, ref_loss, ref_grads = eager_runs["lora_dequantized"]
    assert torch.equal(loss, ref_loss), f"{loss.item()!r} != {ref_loss.item()!r}; {REPRO}equals_lora"
    for n, g in ref_grads.items():
        assert torch.equal(grads[n], g), f"{n}: {(grads[n] - g).abs().max():.3e}; {REPRO}equals_lora"
    full = eager_runs["lora"][1]
    assert 0 < abs(loss - full) / full <= NF4_LOSS_DRIFT, (loss.item(), full.item())


def _held(forward) -> list[str]:
    """Saved forward outputs that are a dequantised weight or a cast/view of one."""
    from graphllm.passes.quantize_base import _CARRIERS, is_dequantize
    from graphllm.passes.matching import is_call

    held = []
    for out in next(n for n in forward.graph.nodes if n.op == "output").args[0]:
        node = out
        while is_call(node, *_CARRIERS):
            node = node.args[0]
        if isinstance(node, torch.fx.Node) and is_dequantize(node):
            held.append(out.name)
    return held


@pytest.mark.parametrize("backend, amp", [("eager", "fp32"), ("eager", "bf16"), ("inductor", "fp32")])
def test_dequantised_weights_are_recomputed_not_saved(backend, amp, eager_runs):
    from graphllm.planning.memory import saved_activation_bytes

    compiled = eager_runs["qlora"][0] if (backend, amp) == ("eager", "fp32") else _step(True, backend=backend,
                                                                                      amp=amp)[0]
    graphs = compiled.result.train_stage.graphs
    assert _held(graphs["forward"]) == [], f"{REPRO}'recomputed_not_saved and {backend} and {amp}'"
    recomputed = [n for n in graphs["backward"].graph.nodes if n.op == "call_function" and (
        n.target is gops.nf4_dequantize.default or "nf4_dequantize_decomposed" in (n.meta.get("stack_trace") or ""))]
    assert recomputed, "the backward must regenerate the weights it needs (dx = g W)"
    if (backend, amp) == ("eager", "fp32"):
        lora = eager_runs["lora"][0].result.train_stage.graphs["backward"]
        assert saved_activation_bytes(graphs["backward"]) == saved_activation_bytes(lora)


def test_npu_path_decomposition_under_default_partition(monkeypatch):
    """The NPU lowers lora_linear and nf4_dequantize to their decompositions and partitions with default_partition
    (the eager backend given that table here): F.linear's transpose of the weight must not be saved either."""
    from graphllm.ops import lowering

    table = dict(lowering.LOWERINGS["decompose"])
    table[gops.nf4_dequantize.default] = nf4_dequantize_recomputed
    monkeypatch.setitem(lowering.LOWERINGS, "eager", table)
    compiled, loss, _ = _step(True)
    assert _held(compiled.result.train_stage.graphs["forward"]) == [], f"{REPRO}npu_path"
    assert not any(n.target is gops.lora_linear.default for n in compiled.result.train_stage.graphs["forward"].graph.nodes)


def test_full_precision_base_is_released_from_the_model():
    """Memory is the point: after compiling, nothing holds a quantised weight's fp32 Parameter (graphllm.compile
    calls release_quantized_base), and the model holds the NF4 buffers instead."""
    from graphllm.compile import compile_pipeline

    model = load_model("tiny-llama", seed=0)
    weight = weakref.ref(model.model.layers[0].self_attn.q_proj.weight)
    ids = (_randn(2, SEQ, seed=1).abs() * 1000).long()
    plan = CompilePlan(model="tiny-llama", batch_size=2, seq_len=SEQ, backend="eager",
                       lora=LoraConfig(rank=RANK, qlora=True))
    compiled = compile_pipeline(model, (ids, ids), _pipeline(plan))
    compiled(ids, ids).backward()
    gc.collect()
    assert weight() is None, "the full-precision q_proj weight is still referenced after compile"
    names = [n for n, _ in model.named_parameters() if matches(module_path(n), DEFAULT_TARGETS) and ".lora_" not in n]
    assert names == [] and hasattr(model.model.layers[0].self_attn.q_proj, "weight_nf4_codes")


def test_must_not_fire_on_weights_read_elsewhere_and_refuses_without_adapters():
    from graphllm.capture import capture
    from graphllm.errors import GraphllmError
    from graphllm.passes import PassContext, run_passes
    from graphllm.passes.lora import lora
    from graphllm.passes.quantize_base import quantize_base

    model = load_model("tiny-llama", seed=0)
    ids = (_randn(2, SEQ, seed=1).abs() * 1000).long()
    with pytest.raises(GraphllmError, match="--lora-rank"):
        run_passes(capture(model, (ids, ids)), [quantize_base], PassContext())
    gm, _ = run_passes(capture(model, (ids, ids)), [lora.with_options(config=LoraConfig(rank=RANK))], PassContext())
    ops = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is gops.lora_linear.default]
    shared = ops[0].args[1]
    with gm.graph.inserting_after(shared):
        gm.graph.call_function(torch.ops.aten.clone.default, (shared,))  # a second reader of one base weight
    ctx = PassContext()
    gm, (rec,) = run_passes(gm, [quantize_base], ctx)
    assert rec.counters["kept in full precision (read elsewhere too)"] == 1
    assert rec.counters["quantized weights"] == len(ops) - 1
    assert ops[0].args[1] is shared and isinstance(getattr(gm.get_submodule(shared.target.rsplit(".", 1)[0]),
                                                           "weight"), torch.nn.Parameter)
    assert all(op.args[1].target is gops.nf4_dequantize.default for op in ops[1:])


def test_checkpoint_holds_adapters_not_the_base_and_resumes(tmp_path):
    """The NF4 base is non-persistent: checkpoints carry adapters (and the frozen unquantised parameters), and a
    rebuild re-quantises the same base from the model source bit for bit, so resuming gives the same losses."""
    from torch.distributed.checkpoint import FileSystemReader

    from parallel_harness import save_and_resume

    plan = CompilePlan(model="tiny-llama", batch_size=4, seq_len=SEQ, backend="eager",
                       lora=LoraConfig(rank=RANK, qlora=True))
    path, losses, resumed = save_and_resume(plan, tmp_path)
    keys = FileSystemReader(path).read_metadata().state_dict_metadata
    model_keys = [k.removeprefix("model/") for k in keys if k.startswith("model/")]
    assert any(".lora_A" in k for k in model_keys), model_keys
    assert not [k for k in model_keys if "_nf4_" in k or (matches(module_path(k), DEFAULT_TARGETS)
                                                         and ".lora_" not in k)], model_keys
    assert resumed == losses[2:], f"{resumed} != {losses[2:]}; {REPRO}checkpoint"
