"""--offload-optimizer: masters and moments in host memory, streamed through the device chunk by chunk.

On this CPU machine host and device are the same memory, so these tests check correctness (the streamed step is
the resident step, bit for bit; ZeRO-1 ranks offload their own ranges; checkpoints round-trip); the saving applies
on CUDA/NPU (docs/memory.md). Every failure names the command that reproduces it.
"""

from __future__ import annotations

import torch
from dist_util import run_ranks
from parallel_harness import GLOBAL_BATCH, SEQ, batch_at
from test_parallel_optim import CFG, LRS, Tiny
from test_parallel_optim import _train as train
from torch import nn

from graphllm.parallel.master_weights import MasterAdamW
from graphllm.train import TrainConfig, make_optimizer, train_steps

CHUNK = 13
"""Elements per streamed chunk in the small tests: smaller than most parameters (so chunks cut inside them) and
prime (so the cuts fall at no parameter boundary)."""
ADAMW_RTOL = 1e-6  # the same elementwise fp32 AdamW on slices instead of whole tensors (tests/test_parallel_optim.py)
RUN_CFG = TrainConfig(steps=3, lr=1e-2, warmup_steps=1)


def repro(test: str) -> str:
    return f"reproduce: python -m pytest -q tests/test_optimizer_offload.py::{test}"


def _adamw(model: nn.Module, group=None, **kw) -> MasterAdamW:
    return MasterAdamW(dict(model.named_parameters()), lr=CFG.lr, betas=(CFG.beta1, CFG.beta2), eps=CFG.eps,
                       weight_decay=CFG.weight_decay, group=group, **kw)


def _train(opt, model: nn.Module) -> None:
    train(opt, model, 0, len(LRS), skip_bias_at=1)  # seeded gradients, one step without one for norm.bias


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def _snapshot(opt, model: nn.Module) -> dict:
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "state": opt.gathered_state(dict(model.named_parameters())) if hasattr(opt, "gathered_state") else None}


def test_streamed_step_is_the_resident_step():
    for dtype in (torch.bfloat16, torch.float32):
        ref, model, whole = Tiny().to(dtype), Tiny().to(dtype), Tiny()
        ref_opt = _adamw(ref, chunk_numel=CHUNK)  # the same chunks, resident
        opt = _adamw(model, offload=True, chunk_numel=CHUNK)
        assert len(opt.chunks) == -(-111 // CHUNK) and all(sum(s.hi - s.lo for s in c) <= CHUNK for c in opt.chunks)
        for s in opt.segments:  # masters (bf16 params) and moments are host buffers of their own
            assert s.exp_avg.device.type == "cpu" and (s.is_view == (dtype == torch.float32))
        whole_opt = make_optimizer(whole, CFG)  # torch's fused AdamW on fp32, whole tensors
        for o, m in ((ref_opt, ref), (opt, model), (whole_opt, whole)):
            _train(o, m)
        want, got = _snapshot(ref_opt, ref), _snapshot(opt, model)
        for n, p in want["params"].items():
            assert torch.equal(got["params"][n], p), (dtype, n, repro("test_streamed_step_is_the_resident_step"))
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(got["state"]["state"][n][k], want["state"]["state"][n][k]), (dtype, n, k)
        masters = got["state"]["master"] if dtype == torch.bfloat16 else got["params"]
        assert all(torch.equal(masters[n], m) for n, m in want["state"]["master"].items())
        if dtype == torch.float32:  # chunks cut inside tensors: the fused kernel's vector tail moves, ulps apart
            for n, p in whole.named_parameters():
                err = _rel(masters[n], p.detach())
                assert err <= ADAMW_RTOL, (n, err, repro("test_streamed_step_is_the_resident_step"))


def zero1_offload_worker():
    from graphllm.parallel.groups import init_parallel
    from graphllm.planning import Layout

    st = init_parallel(Layout(dp=2, zero1=True))
    model = Tiny().to(torch.bfloat16)
    opt = _adamw(model, st.group("dp"), offload=True, chunk_numel=CHUNK)
    _train(opt, model)
    return _snapshot(opt, model), opt.state_numel(), opt.master_numel()


def test_zero1_offload_dp2_is_the_one_process_step():
    ref = Tiny().to(torch.bfloat16)
    ref_opt = _adamw(ref)
    _train(ref_opt, ref)
    want = _snapshot(ref_opt, ref)
    results = run_ranks(zero1_offload_worker, 2)
    for rank, (got, moments, masters) in enumerate(results):
        assert masters == (56 if rank == 0 else 55) and moments == 2 * masters  # this rank's range only
        for n, p in want["params"].items():
            # the ranks cut their chunks elsewhere than one process does: fp32 ulps apart (see the test above)
            for k in ("exp_avg", "exp_avg_sq"):
                err = _rel(got["state"]["state"][n][k], want["state"]["state"][n][k])
                assert err <= ADAMW_RTOL, (rank, n, k, err, repro("test_zero1_offload_dp2_is_the_one_process_step"))
            master = got["state"]["master"][n]
            assert _rel(master, want["state"]["master"][n]) <= ADAMW_RTOL, (rank, n)
            assert torch.equal(got["params"][n], master.bfloat16()), (rank, n)  # the gathered masters, rounded
            assert torch.equal(got["params"][n], results[0][0]["params"][n]), (rank, n)  # every rank agrees


def test_offloaded_tiny_llama_trains_like_resident_and_round_trips(tmp_path):
    from graphllm.job import build
    from graphllm.plan import CompilePlan
    from graphllm.resume import load_step, save_step

    plan = CompilePlan(model="tiny-llama", batch_size=GLOBAL_BATCH, seq_len=SEQ, backend="eager",
                       params_dtype="bf16", offload_optimizer=True)
    built = build(plan)
    start = {n: p.detach().clone() for n, p in built.engine.named_params.items()}

    def run(offload: bool, *, save_at: int = 0) -> list[float]:
        with torch.no_grad():
            for n, p in built.engine.named_params.items():
                p.copy_(start[n])
        built.engine.offload_optimizer = offload
        opt = built.engine.make_optimizer(RUN_CFG)
        assert opt.offload == offload
        losses = []
        for r in train_steps(built.engine, batch_at, RUN_CFG, optimizer=opt):
            losses.append(r["loss"])
            if r["step"] == save_at:
                save_step(tmp_path, built, opt, save_at)
        return losses

    resident, offloaded = run(False), run(True, save_at=2)
    assert offloaded == resident, (offloaded, resident, repro("test_offloaded_tiny_llama_trains_like_resident_and_round_trips"))
    opt = built.engine.make_optimizer(RUN_CFG)
    start_step = load_step(tmp_path / "step_2", built, opt)
    resumed = [r["loss"] for r in train_steps(built.engine, batch_at, RUN_CFG, optimizer=opt, start_step=start_step)]
    assert start_step == 2 and resumed == offloaded[2:], (resumed, offloaded)
