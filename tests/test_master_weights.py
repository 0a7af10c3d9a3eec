"""--params-dtype bf16 (Megatron's O2): bf16 parameters, fp32 master weights and moments in the optimizer.

The optimizer math against torch AdamW on fp32 copies (exact), 20 steps of tiny-llama against fp32 training (bf16
tolerance), ZeRO-1 at dp2 on gloo against one process, checkpoints across params dtypes, the report's bytes, and
the refusals. Every failure names the command that reproduces it.
"""

from __future__ import annotations

import pytest
import torch
from dist_util import run_ranks
from parallel_harness import GLOBAL_BATCH, SEQ, batch_at
from test_parallel_optim import LRS, Tiny, _set_grads
from torch import nn

from graphllm.errors import GraphllmError
from graphllm.parallel.master_weights import MasterAdamW
from graphllm.train import TrainConfig, make_optimizer, train_steps

O2_LOSS_RTOL = 2e-3
"""bf16 keeps 8 significant bits (unit roundoff 2^-9 ≈ 2e-3): the forward's activations and matmul outputs are
rounded at that relative size, while norms, softmax and the loss compute in fp32 from them. A loss that drifts
further than one roundoff from fp32 training (measured over 20 steps of tiny-llama: 3e-4) means something beyond
bf16 rounding — a master kept in bf16, moments in bf16 — went wrong."""
DP_LOSS_RTOL = 2e-3
"""dp2 against one process, both bf16: each rank's gradient over half the rows is rounded to bf16 before the fp32
average, the one-process gradient over all rows once: bf16 roundoff again, not fp32 reduction order."""
STEPS = 20
CFG = TrainConfig(steps=STEPS, lr=3e-3, warmup_steps=2)


def repro(test: str) -> str:
    return f"reproduce: python -m pytest -q tests/test_master_weights.py::{test}"


def _plan(**kw):
    from graphllm.plan import CompilePlan
    from graphllm.planning import Layout

    layout = Layout(**kw.pop("layout", {}))
    return CompilePlan(model="tiny-llama", batch_size=GLOBAL_BATCH // layout.dp, seq_len=SEQ, backend="eager",
                       layout=layout, **kw)


def _train(plan, steps: int = STEPS):
    from graphllm.job import build

    built = build(plan)
    opt = built.engine.make_optimizer(CFG)
    # range first: zip stops before asking the generator for a step more
    losses = [r["loss"] for _, r in zip(range(steps), train_steps(built.engine, batch_at, CFG, optimizer=opt))]
    return built, opt, losses


@pytest.fixture(scope="module")
def fp32_run():
    return _train(_plan())


@pytest.fixture(scope="module")
def o2_run():
    return _train(_plan(params_dtype="bf16"))


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ---- the optimizer math -------------------------------------------------------------------------------------

def test_master_update_is_torch_adamw_on_fp32_copies():
    model = Tiny().to(torch.bfloat16)
    ref = Tiny()
    ref.load_state_dict({n: p.float() for n, p in model.state_dict().items()})  # the same bf16-exact start
    ref_opt = make_optimizer(ref, CFG)
    opt = MasterAdamW(dict(model.named_parameters()), lr=CFG.lr, betas=(CFG.beta1, CFG.beta2), eps=CFG.eps,
                      weight_decay=CFG.weight_decay, group=None)
    for step, lr in enumerate(LRS):
        for o in (ref_opt, opt):
            for g in o.param_groups:
                g["lr"] = lr
        _set_grads(model, step, skip_bias=step == 1)  # one step without a gradient for norm.bias
        for p, q in zip(ref.parameters(), model.parameters()):
            p.grad = None if q.grad is None else q.grad.float()  # the master sees the bf16 gradient, widened
        ref_opt.step()
        opt.step()
    state = opt.gathered_state(dict(model.named_parameters()))
    for (n, want), got in zip(ref.named_parameters(), model.parameters()):
        assert state["master"][n].dtype == torch.float32 and torch.equal(state["master"][n], want.detach()), \
            (n, repro("test_master_update_is_torch_adamw_on_fp32_copies"))
        assert got.dtype == torch.bfloat16 and torch.equal(got, want.detach().bfloat16()), n  # the master, rounded
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state["state"][n][k], ref_opt.state[want][k]), (n, k)
    assert state["step"] == len(LRS)
    assert opt.master_numel() == sum(p.numel() for p in model.parameters())


# ---- tiny-llama: 20 steps against fp32 -------------------------------------------------------------------------

def test_o2_tracks_fp32_training_over_20_steps(fp32_run, o2_run):
    built, opt, losses = o2_run
    want = fp32_run[2]
    assert {p.dtype for p in built.engine.params} == {torch.bfloat16} and isinstance(opt, MasterAdamW)
    mm = [n for n in built.result.train_stage.graphs["forward"].graph.nodes if n.target == torch.ops.aten.mm.default]
    assert mm and all(n.meta["val"].dtype == torch.bfloat16 for n in mm)  # the graph's matmuls run in bf16
    worst = max(rel(a, b) for a, b in zip(losses, want))
    assert 0 < worst <= O2_LOSS_RTOL, (worst, losses, want, repro("test_o2_tracks_fp32_training_over_20_steps"))
    assert losses[-1] < losses[0]


def test_report_counts_o2_bytes(o2_run, fp32_run):
    from graphllm.planning.optimizer_memory import optimizer_bytes
    from graphllm.report import rank_memory

    built, opt, _ = o2_run
    numel = sum(p.numel() for p in built.engine.params)
    mem = rank_memory(built)
    assert mem["parameter_bytes"] == mem["gradient_bytes"] == 2 * numel == sum(p.nbytes for p in built.engine.params)
    assert mem["master_weight_bytes"] == 4 * opt.master_numel() == 4 * numel
    assert mem["optimizer_moment_bytes"] == 4 * opt.state_numel() == 8 * numel
    assert rank_memory(fp32_run[0])["optimizer_bytes"] == 8 * numel  # fp32: the parameters are the masters
    z = optimizer_bytes(101, "bf16", zero1=True, dp=4, offload=True, chunk_numel=10)
    assert (z["master_bytes"], z["moment_bytes"], z["optimizer_host_bytes"], z["optimizer_device_bytes"]) == \
        (26 * 4, 26 * 8, 26 * 12, 0)  # ceil(101 / 4) = 26 elements per rank, on the host
    assert z["optimizer_step_bytes"] == 10 * 16  # one chunk of 10 on the device: master, moments, fp32 gradient
    assert (z["gradient_reduce_bytes"], z["parameter_gather_bytes"]) == (101 * 4, 101 * 2)


# ---- checkpoints -------------------------------------------------------------------------------------------------

def _continue(built, opt, steps: int = 2) -> list[float]:
    """Steps STEPS+1..STEPS+steps of a run that did STEPS (a longer schedule with the same lr so far)."""
    cfg = TrainConfig(steps=STEPS + steps, lr=CFG.lr, warmup_steps=CFG.warmup_steps)
    return [r["loss"] for r in train_steps(built.engine, batch_at, cfg, optimizer=opt, start_step=STEPS)]


def test_o2_checkpoint_resumes_exactly_and_loads_at_either_dtype(tmp_path, o2_run, fp32_run):
    from torch.distributed.checkpoint import FileSystemReader

    from graphllm.resume import load_step, save_step

    built, opt, _ = o2_run
    path = save_step(tmp_path / "o2", built, opt, STEPS)
    md = FileSystemReader(path).read_metadata().state_dict_metadata
    weights = {k: v.properties.dtype for k, v in md.items() if k.startswith("model/")}
    assert weights and set(weights.values()) == {torch.float32}  # the masters, not the rounded parameters
    masters = opt.gathered_state(built.engine.named_params)["master"]
    want = _continue(built, opt)
    fresh = built.engine.make_optimizer(CFG)  # parameters and optimizer state both come from the checkpoint
    assert load_step(path, built, fresh) == STEPS
    assert _continue(built, fresh) == want, repro("test_o2_checkpoint_resumes_exactly_and_loads_at_either_dtype")
    # the O2 checkpoint at fp32: the parameters are the masters, unrounded
    fp32, fp32_opt, _ = fp32_run
    load_step(path, fp32, fp32_opt)
    for n, p in fp32.engine.named_params.items():
        assert p.dtype == torch.float32 and torch.equal(p.detach(), masters[n]), n
    # and an fp32 checkpoint under O2: the masters are its fp32 parameters, the parameters their rounding
    path = save_step(tmp_path / "fp32", fp32, fp32_opt, STEPS)
    load_step(path, built, fresh)
    masters = fresh.gathered_state(built.engine.named_params)["master"]
    for n, p in fp32.engine.named_params.items():
        q = built.engine.named_params[n]
        assert torch.equal(masters[n], p.detach()) and torch.equal(q.detach(), p.detach().bfloat16()), n



def test_weights_only_checkpoint_gives_o2_its_unrounded_masters(tmp_path, o2_run, fp32_run):
    """A weights-only checkpoint (what `graphllm convert` writes) of fp32 weights, loaded under O2: the parameters are
    their bf16 rounding, the optimizer's masters the fp32 values themselves (not the rounded parameters widened)."""
    from graphllm.parallel.checkpoint import save_checkpoint
    from graphllm.resume import WEIGHTS_ONLY, load_step, weights_fingerprint

    built, _, _ = o2_run
    fp32 = fp32_run[0].engine.named_params
    meta = {"kind": WEIGHTS_ONLY, "fingerprint": weights_fingerprint(built.model.config)}
    path = save_checkpoint(tmp_path / "w", step=0, named_params=dict(fp32), optim_state=None, extra={}, meta=meta,
                           st=None)
    fresh = built.engine.make_optimizer(CFG)
    assert load_step(path, built, fresh) == 0
    masters = fresh.gathered_state(built.engine.named_params)["master"]
    rounded = 0
    for n, p in fp32.items():
        assert torch.equal(masters[n], p.detach()), n
        assert torch.equal(built.engine.named_params[n].detach(), p.detach().bfloat16()), n
        rounded += int(not torch.equal(p.detach().bfloat16().float(), p.detach()))
    assert rounded  # fp32 weights bf16 cannot hold: the test would pass vacuously without them

# ---- ZeRO-1 at dp2 on gloo -----------------------------------------------------------------------------------------

def zero1_o2_worker(steps: int):
    built, opt, losses = _train(_plan(params_dtype="bf16", layout={"dp": 2, "zero1": True}), steps)
    bw = built.result.train_stage.graphs["backward"]
    reduced = [n.meta["val"].dtype for n in bw.graph.nodes if n.target == torch.ops._c10d_functional.all_reduce.default]
    return {"losses": losses, "params": {n: p.detach().clone() for n, p in built.engine.named_params.items()},
            "reduce_dtypes": reduced, "masters": opt.master_numel(), "total": opt.total,
            "reduced": _engine_reduce(built)}


def _rank_grads(rank: int) -> list[torch.Tensor | None]:
    return [None if (rank == 0 and i == 1) else torch.randn(7, generator=torch.Generator().manual_seed(10 * rank + i))
            .bfloat16() for i in range(3)]


def _engine_reduce(built) -> list[torch.Tensor]:
    """What the engine's own averaging (used with micro-batches or a pipeline) makes of bf16 gradients."""
    import torch.distributed as dist

    from graphllm.parallel.optim import reduce_gradients

    params = [nn.Parameter(torch.zeros(7, dtype=torch.bfloat16)) for _ in range(3)]
    for p, g in zip(params, _rank_grads(dist.get_rank())):
        p.grad = g
    reduce_gradients(params, built.engine.st.group("dp"))
    return [p.grad for p in params]


def test_zero1_o2_dp2_matches_one_process(o2_run):
    steps = 3
    want = o2_run[2][:steps]
    r0, r1 = run_ranks(zero1_o2_worker, 2, steps)
    for r in (r0, r1):
        worst = max(rel(a, b) for a, b in zip(r["losses"], want))
        assert worst <= DP_LOSS_RTOL, (worst, r["losses"], want, repro("test_zero1_o2_dp2_matches_one_process"))
        assert r["reduce_dtypes"] and set(r["reduce_dtypes"]) == {torch.float32}  # bf16 grads averaged in fp32
        assert abs(r["masters"] - r["total"] / 2) <= 1  # each rank keeps the masters of half the elements
    assert r0["losses"] == r1["losses"]
    for i, (a, b) in enumerate(zip(_rank_grads(0), _rank_grads(1))):
        a = a if a is not None else torch.zeros(7, dtype=torch.bfloat16)
        want = ((a.float() + b.float()) / 2).bfloat16()  # the fp32 mean, rounded once
        assert all(r["reduced"][i].dtype == torch.bfloat16 and torch.equal(r["reduced"][i], want) for r in (r0, r1)), i
    assert all(torch.equal(r0["params"][n], r1["params"][n]) for n in r0["params"])  # the all-gather agrees


# ---- refusals --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [({"amp": "bf16"}, "--params-dtype bf16 with --amp bf16"),
                                       ({"lora": {"rank": 4}}, "with LoRA/QLoRA")], ids=["amp", "lora"])
def test_refused_combinations(kw, match):
    from graphllm.planning.lora_config import LoraConfig

    if "lora" in kw:
        kw = {"lora": LoraConfig(**kw["lora"])}
    with pytest.raises(GraphllmError, match=match):
        _plan(params_dtype="bf16", **kw)


def test_cli_refuses_o2_with_amp_and_writes_nothing(tmp_path):
    from graphllm.cli.main import main

    out = tmp_path / "art"
    assert main(["compile", "--model", "tiny-llama", "--params-dtype", "bf16", "--amp", "bf16", "--out", str(out)]) == 2
    assert not out.exists()
