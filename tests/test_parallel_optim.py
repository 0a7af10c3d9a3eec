"""graphllm.parallel.optim on real gloo ranks against torch in one process.

Gradients are set, not learned (exact values from seeded generators, or d/dw sum(w * x) = x), so each
comparison isolates the distributed arithmetic. Numeric failures name the command that reproduces them.
"""

from __future__ import annotations

import pytest
import torch
from dist_util import run_ranks
from torch import nn

from graphllm.planning import Layout, shard_param
from graphllm.parallel.optim import (
    ZeroAdamW,
    clip_grad_norm,
    grad_norm,
    load_optimizer_state,
    optimizer_state,
    reduce_gradients,
)
from graphllm.train import TrainConfig, make_optimizer

NORM_RTOL = 1e-6  # fp32 sum of squares, summed in another order than torch's per-tensor norms
ADAMW_RTOL = 1e-6  # the same elementwise fp32 AdamW update, on slices instead of whole tensors
CFG = TrainConfig(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
LRS = [1e-2, 7e-3, 4e-3, 2e-3, 1e-3]  # the loop sets param_groups' lr before every step


def repro(test: str) -> str:
    return f"reproduce: python -m pytest -q tests/test_parallel_optim.py::{test}"


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def seeded(shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---- reduce_gradients -------------------------------------------------------------------------------------

GRAD_SHAPES = {"a": ((10,), torch.float32), "b": ((4, 5), torch.float32), "c": ((30,), torch.float32),
               "d": ((5,), torch.float32), "e": ((3, 3), torch.float64), "none_anywhere": ((4,), torch.float32),
               "none_on_rank0": ((6,), torch.float32)}


def _rank_grads(rank: int) -> dict[str, torch.Tensor | None]:
    grads = {n: seeded(shape, 1000 * rank + i, dtype) for i, (n, (shape, dtype)) in enumerate(GRAD_SHAPES.items())}
    grads["none_anywhere"] = None
    if rank == 0:
        grads["none_on_rank0"] = None
    return grads


def reduce_worker(bucket_bytes: int):
    import torch.distributed as dist

    from graphllm.parallel.groups import init_parallel

    st = init_parallel(Layout(dp=2))
    params = {n: nn.Parameter(torch.zeros(shape, dtype=dtype)) for n, (shape, dtype) in GRAD_SHAPES.items()}
    for n, g in _rank_grads(dist.get_rank()).items():
        params[n].grad = g
    buckets = reduce_gradients(list(params.values()), st.group("dp"), bucket_bytes=bucket_bytes)
    return buckets, {n: p.grad for n, p in params.items()}


def test_reduce_gradients_is_the_mean_in_buckets():
    # fp32 bytes 40, 80, 120, 20, 16, 24 under a 128-byte cap: [a b] [c] [d none none]; fp64: [e]
    results = run_ranks(reduce_worker, 2, 128)
    g0, g1 = _rank_grads(0), _rank_grads(1)
    for buckets, grads in results:
        assert buckets == 4
        for n, (shape, dtype) in GRAD_SHAPES.items():
            want = ((g0[n] if g0[n] is not None else torch.zeros(shape, dtype=dtype))
                    + (g1[n] if g1[n] is not None else torch.zeros(shape, dtype=dtype))) / 2
            assert grads[n].dtype == dtype and torch.equal(grads[n], want), (n, repro("test_reduce_gradients_is_the_mean_in_buckets"))  # (x + y) / 2 is exact either way


def test_reduce_gradients_without_a_group_does_nothing():
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    assert reduce_gradients([p], None) == 0 and torch.equal(p.grad, torch.full((3,), 2.0))


# ---- grad_norm / clip_grad_norm -----------------------------------------------------------------------------

# name -> (full shape, tensor-parallel shard dim or None for whole)
NORM_PARAMS = {"emb.weight": ((6, 4), None), "q.weight": ((8, 4), 0), "o.weight": ((4, 8), 1), "norm.weight": ((4,), None)}
MAX_NORMS = (0.5, 1e3, 0.0)  # clips, coefficient clamped to 1, disabled


def _reference_clip(max_norm: float) -> tuple[float, dict[str, torch.Tensor]]:
    full = {n: nn.Parameter(seeded(shape, i)) for i, (n, (shape, _)) in enumerate(NORM_PARAMS.items())}
    for i, (n, p) in enumerate(full.items()):
        p.grad = seeded(p.shape, 100 + i)
    norm = torch.nn.utils.clip_grad_norm_(list(full.values()), max_norm if max_norm > 0 else float("inf"))
    return float(norm), {n: p.grad for n, p in full.items()}


def norm_worker(layout: dict):
    from graphllm.parallel.groups import init_parallel

    st = init_parallel(Layout(**layout))
    tp, c = st.layout.tp, st.coords
    names = list(NORM_PARAMS)
    held = names[c.pp * len(names) // st.layout.pp:(c.pp + 1) * len(names) // st.layout.pp]  # disjoint per stage
    out = []
    for max_norm in MAX_NORMS:
        named, loss = {}, 0
        for i, (n, (shape, dim)) in enumerate(NORM_PARAMS.items()):
            if n not in held:
                continue
            w, x = nn.Parameter(seeded(shape, i)), seeded(shape, 100 + i)
            if dim is not None and tp > 1:
                w, x = shard_param(w, dim, c.tp, tp), x.chunk(tp, dim)[c.tp]
            named[n] = w
            loss = loss + (w * x).sum()  # d loss / d w = x exactly
        loss.backward()
        norm = clip_grad_norm(named, max_norm, st)
        ref_norm, ref_grads = _reference_clip(max_norm)
        errs = {}
        for n, p in named.items():
            dim = NORM_PARAMS[n][1]
            want = ref_grads[n].chunk(tp, dim)[c.tp] if dim is not None and tp > 1 else ref_grads[n]
            errs[n] = rel_err(p.grad, want)
        out.append((norm, ref_norm, errs))
    return out


@pytest.mark.parametrize("layout", [{"tp": 2}, {"pp": 2, "micro_batches": 2}, {"tp": 2, "dp": 2}],
                         ids=["tp2", "pp2", "tp2xdp2"])
def test_clip_grad_norm_matches_torch_on_the_whole_model(layout):
    world = Layout(**layout).world_size
    for rank, per_norm in enumerate(run_ranks(norm_worker, world, layout)):
        for max_norm, (norm, ref_norm, errs) in zip(MAX_NORMS, per_norm):
            assert abs(norm - ref_norm) <= NORM_RTOL * ref_norm, (rank, max_norm, norm, ref_norm, repro("test_clip_grad_norm_matches_torch_on_the_whole_model"))
            assert errs and max(errs.values()) <= NORM_RTOL, (rank, max_norm, errs, repro("test_clip_grad_norm_matches_torch_on_the_whole_model"))


def test_grad_norm_in_one_process_is_torchs():
    ps = [nn.Parameter(seeded((5, 3), 1)), nn.Parameter(seeded((7,), 2))]
    for i, p in enumerate(ps):
        p.grad = seeded(p.shape, 10 + i)
    want = torch.nn.utils.get_total_norm([p.grad for p in ps])
    assert rel_err(grad_norm({"a": ps[0], "b": ps[1]}, None), want) <= NORM_RTOL


# ---- ZeroAdamW ------------------------------------------------------------------------------------------------

class Tiny(nn.Module):
    """111 parameters: odd, so at dp2 one range is padded, and the cut falls inside proj.weight."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 5)
        self.proj = nn.Linear(5, 7)
        self.norm = nn.LayerNorm(7)


def _set_grads(model: nn.Module, step: int, *, skip_bias: bool = False) -> None:
    """The step's (already dp-averaged) gradients; `skip_bias` leaves norm.bias without one."""
    for i, (n, p) in enumerate(model.named_parameters()):
        p.grad = None if skip_bias and n == "norm.bias" else seeded(p.shape, 1000 * step + i, p.dtype)


def _train(opt, model: nn.Module, start: int, stop: int, *, skip_bias_at: int = -1) -> None:
    for step in range(start, stop):
        for group in opt.param_groups:
            group["lr"] = LRS[step]
        _set_grads(model, step, skip_bias=step == skip_bias_at)
        opt.step()
        opt.zero_grad(set_to_none=True)


def _zero(model: nn.Module, group) -> ZeroAdamW:
    return ZeroAdamW(dict(model.named_parameters()), lr=CFG.lr, betas=(CFG.beta1, CFG.beta2), eps=CFG.eps,
                     weight_decay=CFG.weight_decay, group=group)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def zero_parity_worker(steps: int):
    from graphllm.parallel.groups import init_parallel

    st = init_parallel(Layout(dp=2, zero1=True))
    model = Tiny()
    opt = _zero(model, st.group("dp"))
    _train(opt, model, 0, steps, skip_bias_at=1)
    return _params(model), opt.state_numel(), (opt.start, opt.end)


def test_zero_adamw_dp2_matches_fused_adamw():
    steps = 3
    ref = Tiny()
    _train(make_optimizer(ref, CFG), ref, 0, steps, skip_bias_at=1)
    want = _params(ref)
    total = sum(p.numel() for p in want.values())
    results = run_ranks(zero_parity_worker, 2, steps)
    for rank, (got, state_numel, (lo, hi)) in enumerate(results):
        for n in want:
            assert rel_err(got[n], want[n]) <= ADAMW_RTOL, (rank, n, rel_err(got[n], want[n]), repro("test_zero_adamw_dp2_matches_fused_adamw"))
        assert (lo, hi) == (rank * 56, min(total, (rank + 1) * 56))
        assert state_numel == 2 * (hi - lo)  # exp_avg + exp_avg_sq for this rank's range only
        assert abs(state_numel - total) <= 2, (rank, state_numel, total)  # ≈ 2 * total / dp


def test_zero_adamw_without_a_group_is_adamw():
    ref, model = Tiny(), Tiny()
    _train(make_optimizer(ref, CFG), ref, 0, 3, skip_bias_at=1)
    _train(_zero(model, None), model, 0, 3, skip_bias_at=1)
    want, got = _params(ref), _params(model)
    assert all(rel_err(got[n], want[n]) <= ADAMW_RTOL for n in want), repro("test_zero_adamw_without_a_group_is_adamw")


def test_zero_adamw_keeps_fp32_master_weights_for_bf16_params():
    ref, model = Tiny(), Tiny().to(torch.bfloat16)
    ref.load_state_dict({n: p.float() for n, p in model.state_dict().items()})  # the same (bf16-exact) start
    ref_opt, opt = make_optimizer(ref, CFG), _zero(model, None)
    assert not any(x.is_view for x in opt.pieces)
    for step in range(3):
        for o in (ref_opt, opt):
            for group in o.param_groups:
                group["lr"] = LRS[step]
        _set_grads(model, step)
        _set_grads(ref, step)
        for p, q in zip(ref.parameters(), model.parameters()):
            p.grad = q.grad.float()  # what the master sees: the bf16 gradient, widened
        ref_opt.step()
        opt.step()
    # the updates accumulate in fp32 (not in bf16); the parameters are their rounding
    for (n, want), got in zip(ref.named_parameters(), model.parameters()):
        assert got.dtype == torch.bfloat16 and torch.equal(got, want.detach().to(torch.bfloat16)), n


# ---- optimizer_state / load_optimizer_state ---------------------------------------------------------------------

SAVE_AT, STEPS = 2, 4


def zero_resume_worker(params: dict, state: dict):
    """Uninterrupted ZeroAdamW run saving its state at SAVE_AT, and a ZeroAdamW resumed from `state`."""
    from graphllm.parallel.groups import init_parallel

    st = init_parallel(Layout(dp=2, zero1=True))
    model = Tiny()
    opt = _zero(model, st.group("dp"))
    _train(opt, model, 0, SAVE_AT)
    saved = (_params(model), optimizer_state(opt, dict(model.named_parameters())))
    _train(opt, model, SAVE_AT, STEPS)
    uninterrupted = _params(model)

    resumed = Tiny()
    opt = _zero(resumed, st.group("dp"))
    resumed.load_state_dict(params)  # the checkpoint writes the parameters before the optimizer state
    load_optimizer_state(opt, dict(resumed.named_parameters()), state)
    _train(opt, resumed, SAVE_AT, STEPS)
    return saved, uninterrupted, _params(resumed)


def test_optimizer_state_round_trips_between_zero_dp2_and_one_process():
    ref = Tiny()
    ref_opt = make_optimizer(ref, CFG)
    _train(ref_opt, ref, 0, SAVE_AT)
    ref_saved = (_params(ref), optimizer_state(ref_opt, dict(ref.named_parameters())))
    _train(ref_opt, ref, SAVE_AT, STEPS)
    want = _params(ref)

    for rank, ((params, state), uninterrupted, resumed) in enumerate(run_ranks(zero_resume_worker, 2, *ref_saved)):
        # the gathered ZeRO state is the one-process state
        assert state["step"] == ref_saved[1]["step"] == SAVE_AT
        for n, entry in ref_saved[1]["state"].items():
            for k, t in entry.items():
                assert state["state"][n][k].shape == t.shape and rel_err(state["state"][n][k], t) <= ADAMW_RTOL, (n, k)
        # one process -> ZeRO dp2, and the uninterrupted dp2 run
        for n in want:
            assert rel_err(resumed[n], want[n]) <= ADAMW_RTOL, (rank, "resumed at dp2", n)
            assert rel_err(uninterrupted[n], want[n]) <= ADAMW_RTOL, (rank, "dp2", n)
        # ZeRO dp2 -> one process
        model = Tiny()
        opt = make_optimizer(model, CFG)
        model.load_state_dict(params)
        load_optimizer_state(opt, dict(model.named_parameters()), state)
        _train(opt, model, SAVE_AT, STEPS)
        got = _params(model)
        for n in want:
            assert rel_err(got[n], want[n]) <= ADAMW_RTOL, (rank, "resumed in one process", n)


def test_load_optimizer_state_names_a_mismatched_parameter():
    from graphllm.errors import GraphllmError

    model = Tiny()
    opt = make_optimizer(model, CFG)
    state = optimizer_state(opt, dict(model.named_parameters()))
    state["state"]["proj.weight"] = {k: torch.zeros(3) for k in ("exp_avg", "exp_avg_sq")}
    with pytest.raises(GraphllmError, match="proj.weight"):
        load_optimizer_state(opt, dict(model.named_parameters()), state)
