"""Train a few steps under a layout (one rank of it, or one process) and collect losses and parameters.

Used by the parallel tests: each rank returns its losses and its local parameters with their
ParamShard; `assemble` turns the ranks' pieces back into the model's full tensors.
"""

from __future__ import annotations

import torch

SEQ = 32
GLOBAL_BATCH = 4
VOCAB = 8000  # tiny-llama
ADAM_EPS = 1e-6
"""With eps 1e-8 Adam's first update is about lr·sign(g): an element whose gradient is rounding noise
(~1e-12) moves by ±lr depending on the order the ranks summed it, so comparing parameters would compare
noise signs (measured: a few elements in 10^5 differ by up to 2·lr at tp2). eps 1e-6 bounds such an
element's update by lr·|g|/eps, so parameter parity measures the parallel arithmetic, not noise."""


def batch_at(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    return ids, torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)


def make_plan(**layout):
    from graphllm.plan import CompilePlan
    from graphllm.planning import Layout

    dp, micro = layout.get("dp", 1), layout.get("micro_batches", 1)
    backend, amp = layout.pop("backend", "eager"), layout.pop("amp", "fp32")
    return CompilePlan(model="tiny-llama", batch_size=GLOBAL_BATCH // (dp * micro), seq_len=SEQ, backend=backend,
                       amp=amp, layout=Layout(**layout))


def train(layout: dict, steps: int = 5, lr: float = 1e-3, *, save: str | None = None, stop_after: int | None = None,
          load: str | None = None) -> dict:
    """Build the plan on this rank and train to step `steps` (of a `steps`-step schedule); with `save`,
    checkpoint after `stop_after` steps and stop there; with `load`, resume from that checkpoint first.
    Returns the losses of the steps run and this rank's parameters."""
    from graphllm.job import build
    from graphllm.planning.sharding import shard_of
    from graphllm.resume import load_step, save_step
    from graphllm.train import TrainConfig, train_steps

    built = build(make_plan(**dict(layout)))
    cfg = TrainConfig(steps=steps, lr=lr, warmup_steps=1, grad_clip=1.0, eps=ADAM_EPS)
    opt = built.engine.make_optimizer(cfg)
    start = load_step(load, built, opt) if load else 0
    losses = []
    for r in train_steps(built.engine, batch_at, cfg, optimizer=opt, start_step=start):
        losses.append(r["loss"])
        if save and r["step"] == stop_after:
            save_step(save, built, opt, r["step"])
            break
    st = built.engine.st
    params = {n: (p.detach().clone(), shard_of(p)) for n, p in built.engine.named_params.items()}
    return {"losses": losses, "params": params, "dp": st.coords.dp if st else 0}


def save_and_resume(plan, root) -> tuple[str, list[float], list[float]]:
    """3 steps of `plan` saving step 2 under `root`, then a rebuild resumed from it: (checkpoint path, the
    first run's losses, the resumed run's losses) — a resume must give losses[2:]."""
    from graphllm.job import build
    from graphllm.resume import load_step, save_step
    from graphllm.train import TrainConfig, train_steps

    cfg = TrainConfig(steps=3, lr=1e-2, warmup_steps=1)
    built = build(plan)
    opt = built.engine.make_optimizer(cfg)
    losses, path = [], None
    for r in train_steps(built.engine, batch_at, cfg, optimizer=opt):
        losses.append(r["loss"])
        if r["step"] == 2:
            path = save_step(root, built, opt, 2)
    again = build(plan)
    opt2 = again.engine.make_optimizer(cfg)
    start = load_step(path, again, opt2)
    return path, losses, [r["loss"] for r in train_steps(again.engine, batch_at, cfg, optimizer=opt2, start_step=start)]


def assemble(results: list[dict]) -> dict[str, torch.Tensor]:
    """Full parameters from the ranks' pieces (data-parallel rank 0's copies)."""
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    dims: dict[str, int | None] = {}
    for r in results:
        if r["dp"] != 0:
            continue
        for name, (t, shard) in r["params"].items():
            pieces.setdefault(name, {})[shard.index if shard else 0] = t
            dims[name] = shard.dim if shard else None
    return {n: (torch.cat([p[i] for i in sorted(p)], dims[n]) if dims[n] is not None else p[0])
            for n, p in pieces.items()}
