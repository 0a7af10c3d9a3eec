"""The fused LM-head loss (graphllm::linear_cross_entropy): peak memory and step time with and without it.

`--part step` (default): small-llama's training step (batch 1 × seq 512, vocab 32000: train_step.py's shape), compiled
by graphllm with inductor twice — the default passes with fuse_linear_cross_entropy forced on (`min_bytes=0`, what
`--fused-loss on` sets: its default leaves logits under 1 GiB unfused) ("fused") and without it ("unfused") — for each `--amp`. One step = zero_grad + forward + loss + backward + fused AdamW (train_step.py's
Contender). Time: both contenders interleaved in this process (a first compiling step each, warm-up, then `--rounds`
rounds of `--steps-per-round` steps, order rotated), medians over the steady steps and the per-round ratio.
Memory, per contender alone in a fresh subprocess:
- CUDA: torch.cuda.max_memory_allocated over the measured steps minus the memory allocated before them;
- CPU: VmHWM over the measured steps (reset through /proc/self/clear_refs) minus the RSS before them, with
  MALLOC_MMAP_THRESHOLD_=65536 so that every tensor above 64 KiB is its own mapping, returned to the system when
  freed: the high-water mark is then the peak of live tensors (plus the allocator's small-block heap).
Twice: with the gradients freed before each step (zero_grad(set_to_none=True), train_step.py's step: they are born
during the backward, and at this shape their 511 MiB set the step's peak), and kept (set_to_none=False, as under
gradient accumulation: resident all step, so the peak above them is the activations' and temporaries').
Also from the compiled graphs: the bytes the forward saves for the backward (planning.memory.saved_activation_bytes).

`--part head` (the design measurement, ops/linear_cross_entropy.py): the LM head and its loss alone at the step's
shape (hidden [N, H] → loss, backward into hidden and W), each variant torch.compile'd with inductor (or `--eager`):
time interleaved in this process (`--rounds` rounds of `--reps` steps per variant, order rotated; medians and the
per-round ratio to unfused), peak as above with each variant alone in a subprocess:
- unfused:        F.cross_entropy(linear(h, W).float(), labels)
- vocab:          the op's decomposition (vocabulary chunks, backward recomputes W_k hᵀ)
- vocab_unordered: the same without the op's ordering fence: inductor computes every chunk's logits first
- token:          token chunks, backward recomputes, grad_W accumulated over the chunks (addmm)
- token_liger:    token chunks with the gradients computed in the forward (Liger): the backward scales them

    python benchmarks/fused_loss.py --amp both --json runs/fused_loss.json
    python benchmarks/fused_loss.py --part head --json runs/fused_loss_head.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common`, `train_step` when run as a script
from common import (current_rss_bytes, ensure_inductor_cache, fmt_mib, interleave, median,  # noqa: E402
                    peak_rss_bytes)

CACHE_DIR, CACHE_WARM = ensure_inductor_cache()  # before torch reads its inductor config

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

CONTENDERS = ("fused", "unfused")
VARIANTS = ("unfused", "vocab", "vocab_unordered", "token", "token_liger")
LOSS_RTOL = {"fp32": 1e-5, "bf16": 2e-2}
"""First-step loss, fused vs unfused, same weights and data: fp32 differs by reduction order; bf16 by where the
matmul partials are rounded (see tests/test_fused_loss.py)."""
MMAP_THRESHOLD = "65536"
CHUNKS = 8  # the pass's default vocabulary chunks for small-llama (passes/fuse_linear_cross_entropy.py)


# ---------------------------------------------------------------- memory probes (this process)


def _clear_peak(device: torch.device) -> int:
    """Start a peak measurement; returns the baseline (bytes allocated on CUDA, RSS on CPU)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")
    return current_rss_bytes()


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return peak_rss_bytes()


def _child(args: argparse.Namespace, extra: list[str]) -> dict:
    """This script again in a fresh process (glibc's mmap threshold fixed, see the module docstring)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--seed", str(args.seed),
           "--batch", str(args.batch), "--seq", str(args.seq), "--model", args.model, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env, check=False)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- part step: the training step


def build(name: str, source, batches, amp: str, device: torch.device):
    import copy

    import graphllm
    from graphllm.train import TrainConfig, make_optimizer
    from train_step import Contender

    model = copy.deepcopy(source).to(device)
    x, y = batches[0]
    from graphllm.passes.pipeline import default_passes

    fused = [p.with_options(min_bytes=0) if p.name == "fuse_linear_cross_entropy" else p for p in default_passes()]
    passes = fused if name == "fused" else [p for p in fused if p.name != "fuse_linear_cross_entropy"]
    compiled = graphllm.compile(model, x, y, backend="inductor", amp=amp, passes=passes)
    return Contender(name, model, compiled, make_optimizer(model, TrainConfig()), 0.0, compiled=compiled)


def _batches(args, vocab: int, device: torch.device):
    from train_step import make_batches

    return [(x.to(device), y.to(device)) for x, y in make_batches(vocab, args.batch, args.seq, args.seed)]


def saved_bytes(compiled) -> int:
    from graphllm.planning.memory import saved_activation_bytes

    graphs = compiled.result.train_stage.graphs
    return saved_activation_bytes(graphs["backward"], graphs.get("forward"))


def step_memory_child(args: argparse.Namespace) -> None:
    """One contender alone: compile, warm up, then the peak over `--mem-steps` steps (printed as JSON). `--mem-grads
    freed`: zero_grad(set_to_none=True) as train_step.py (gradients are born during the backward); `kept`:
    zero_grad(set_to_none=False), the gradients resident all step (gradient accumulation holds them so)."""
    from graphllm.models import load_model

    device = torch.device(args.device)
    source = load_model(args.model, seed=args.seed)
    batches = _batches(args, source.config.vocab_size, device)
    c = build(args.memory_child, source, batches, args.amp[0], device)
    kept = args.mem_grads == "kept"

    def step(i: int) -> None:
        c.opt.zero_grad(set_to_none=not kept)
        x, y = batches[i % len(batches)]
        c.loss_fn(x, y).backward()
        c.opt.step()

    for i in range(2):
        step(i)
    if not kept:
        c.opt.zero_grad(set_to_none=True)
    base = _clear_peak(device)
    for i in range(args.mem_steps):
        step(i)
    print(json.dumps({"peak_delta": _peak(device) - base, "base": base, "grads": args.mem_grads}))


def bench_step(amp: str, args: argparse.Namespace, console: Console) -> dict:
    from graphllm.models import load_model

    torch._dynamo.reset()
    device = torch.device(args.device)
    source = load_model(args.model, seed=args.seed)
    cfg = source.config
    batches = _batches(args, cfg.vocab_size, device)
    tokens = args.batch * args.seq
    console.print(f"[bold]{args.model}[/] amp={amp}: {args.batch} × {args.seq} = {tokens} tokens, vocab "
                  f"{cfg.vocab_size}: fp32 logits {fmt_mib(tokens * cfg.vocab_size * 4)}; compiling…")
    contenders = {n: build(n, source, batches, amp, device) for n in CONTENDERS}
    for name in CONTENDERS:
        contenders[name].step(batches, "first")
    for _ in range(args.warmup):
        for name in CONTENDERS:
            contenders[name].step(batches, "warmup")
    for r, order in enumerate(interleave(list(CONTENDERS), args.rounds)):
        for name in order:
            for _ in range(args.steps_per_round):
                contenders[name].step(batches, f"round{r}")
    steady = {n: [s for s in c.steps if s["tag"].startswith("round")] for n, c in contenders.items()}
    med = {n: median([s["total"] for s in st]) for n, st in steady.items()}
    ratios = [median([s["total"] for s in steady["unfused"] if s["tag"] == f"round{r}"])
              / median([s["total"] for s in steady["fused"] if s["tag"] == f"round{r}"]) for r in range(args.rounds)]
    first = {n: c.steps[0]["loss"] for n, c in contenders.items()}
    res = {"model": args.model, "amp": amp, "device": args.device, "batch": args.batch, "seq": args.seq,
           "vocab": cfg.vocab_size, "logits_fp32_bytes": tokens * cfg.vocab_size * 4,
           "median_step_s": med, "split_s": {n: {k: median([s[k] for s in st]) for k in ("fwd", "bwd", "opt")}
                                             for n, st in steady.items()},
           "unfused_over_fused_rounds": ratios, "unfused_over_fused": med["unfused"] / med["fused"],
           "saved_activation_bytes": {n: saved_bytes(c.compiled) for n, c in contenders.items()},
           "first_loss": first, "loss_rel_diff": abs(first["fused"] - first["unfused"]) / abs(first["unfused"]),
           "loss_rtol": LOSS_RTOL[amp], "step_times_s": {n: [s["total"] for s in st] for n, st in steady.items()}}
    del contenders, source
    gc.collect()
    torch._dynamo.reset()
    if not args.no_memory:
        res["memory"] = {grads: {n: _child(args, ["--memory-child", n, "--amp", amp, "--mem-steps", str(args.mem_steps),
                                                  "--mem-grads", grads]) for n in CONTENDERS}
                         for grads in ("freed", "kept")}
    return res


def print_step(res: dict, console: Console) -> None:
    t = Table(title=f"{res['model']} {res['amp']} ({res['device']}): train step, fused vs unfused LM-head loss")
    for col in ("contender", "median step", "fwd+loss", "bwd", "opt", "saved fwd→bwd", "peak Δ, grads freed",
                "peak Δ, grads kept"):
        t.add_column(col, justify="left" if col == "contender" else "right")
    mem = res.get("memory", {})

    def peak(grads: str, n: str) -> str:
        m = mem.get(grads, {}).get(n, {})
        return fmt_mib(m["peak_delta"]) if "peak_delta" in m else m.get("error", "—")

    for n in CONTENDERS:
        sp = res["split_s"][n]
        t.add_row(n, f"{res['median_step_s'][n]:.3f} s", f"{sp['fwd']:.3f} s", f"{sp['bwd']:.3f} s",
                  f"{sp['opt']:.3f} s", fmt_mib(res["saved_activation_bytes"][n]), peak("freed", n), peak("kept", n))
    console.print(t)
    rs = res["unfused_over_fused_rounds"]
    console.print(f"unfused / fused median step: {res['unfused_over_fused']:.3f}× (rounds {min(rs):.3f}–{max(rs):.3f}; "
                  f">1: fused faster); fp32 logits are {fmt_mib(res['logits_fp32_bytes'])}")
    for grads, m in mem.items():
        if all("peak_delta" in m.get(n, {}) for n in CONTENDERS):
            drop = m["unfused"]["peak_delta"] - m["fused"]["peak_delta"]
            console.print(f"peak drop, gradients {grads}: {fmt_mib(drop)} = {drop / res['logits_fp32_bytes']:.2f}× "
                          "the fp32 logits")
    ok = res["loss_rel_diff"] <= res["loss_rtol"]
    console.print(f"first-step loss: fused {res['first_loss']['fused']:.6f}, unfused {res['first_loss']['unfused']:.6f},"
                  f" rel diff {res['loss_rel_diff']:.1e} (tol {res['loss_rtol']:.0e}) "
                  f"{'[green]OK[/]' if ok else '[red]MISMATCH[/]'}")


# ---------------------------------------------------------------- part head: the design's alternatives


def _spans(n: int, k: int) -> list[tuple[int, int]]:
    c = -(-n // k)
    return [(a, min(a + c, n)) for a in range(0, n, c)]


class _VocabUnordered(torch.autograd.Function):
    """The op's vocabulary chunks without its ordering fence (ops/linear_cross_entropy.py `_after`): inductor is free
    to run every chunk's matmul first and fuse the chunks' reductions into one kernel."""

    @staticmethod
    def forward(ctx, h, w, y):
        m = s = t = None
        for a, b in _spans(w.shape[0], CHUNKS):
            z = torch.mm(h, w[a:b].t()).float()
            inside = (y >= a) & (y < b)
            picked = torch.where(inside, z.gather(1, torch.where(inside, y - a, 0)[:, None]).squeeze(1), 0.0)
            top = z.max(-1)[0]
            new = top if m is None else torch.maximum(m, top)
            part = (z - new[:, None]).exp().sum(-1)
            m, s, t = new, part if s is None else s * (m - new).exp() + part, picked if t is None else t + picked
        lse = m + s.log()
        ctx.save_for_backward(h, w, y, lse)
        return (lse - t).mean()

    @staticmethod
    def backward(ctx, g):
        from graphllm.ops.linear_cross_entropy import parts_backward

        h, w, y, lse = ctx.saved_tensors
        share = (g / h.shape[0]).expand(h.shape[0]).float()
        gh, gw = parts_backward(h, w, y, 0, -(-w.shape[0] // CHUNKS), lse, share, -share, True, True)
        return gh, gw, None


class _TokenChunks(torch.autograd.Function):
    """Token chunks (each holds whole rows of logits); grad_W = Σ over chunks of rank-N/K updates (addmm)."""

    @staticmethod
    def forward(ctx, h, w, y):
        tot = 0
        for a, b in _spans(h.shape[0], CHUNKS):
            z = torch.mm(h[a:b], w.t()).float()
            tot = tot + (torch.logsumexp(z, -1) - z.gather(1, y[a:b, None]).squeeze(1)).sum()
        ctx.save_for_backward(h, w, y)
        return tot / h.shape[0]

    @staticmethod
    def backward(ctx, g):
        h, w, y = ctx.saved_tensors
        gh, gw = [], None
        for a, b in _spans(h.shape[0], CHUNKS):
            z_t = torch.mm(w, h[a:b].t()).float()  # transposed: not merged with the forward's by CSE
            p_t = torch.softmax(z_t, 0).scatter_add(0, y[None, a:b], torch.full((1, b - a), -1.0, device=h.device))
            p_t = (p_t * (g / h.shape[0])).to(h.dtype)
            gh.append(p_t.t() @ w)
            gw = p_t @ h[a:b] if gw is None else torch.addmm(gw, p_t, h[a:b])
        return torch.cat(gh), gw, None


class _TokenLiger(torch.autograd.Function):
    """Liger's fused linear cross-entropy: token chunks, the gradients formed in the forward, scaled in the backward."""

    @staticmethod
    def forward(ctx, h, w, y):
        tot, gh, gw = 0, [], None
        for a, b in _spans(h.shape[0], CHUNKS):
            z = torch.mm(h[a:b], w.t()).float()
            lse = torch.logsumexp(z, -1)
            tot = tot + (lse - z.gather(1, y[a:b, None]).squeeze(1)).sum()
            p = (z - lse[:, None]).exp().scatter_add(1, y[a:b, None], torch.full((b - a, 1), -1.0, device=h.device))
            p = (p / h.shape[0]).to(h.dtype)
            gh.append(p @ w)
            gw = p.t() @ h[a:b] if gw is None else torch.addmm(gw, p.t(), h[a:b])
        ctx.save_for_backward(torch.cat(gh), gw)
        return tot / h.shape[0]

    @staticmethod
    def backward(ctx, g):
        gh, gw = ctx.saved_tensors
        return gh * g, gw * g, None


def head_loss(variant: str):
    from graphllm.ops.linear_cross_entropy import linear_cross_entropy_decomposed

    if variant == "unfused":
        return lambda h, w, y: F.cross_entropy(F.linear(h, w).float(), y)
    if variant == "vocab":
        return lambda h, w, y: linear_cross_entropy_decomposed(h, w, y, -100, 1, -(-w.shape[0] // CHUNKS))[0]
    fn = {"vocab_unordered": _VocabUnordered, "token": _TokenChunks, "token_liger": _TokenLiger}[variant]
    return lambda h, w, y: fn.apply(h, w, y)


def _head_setup(args: argparse.Namespace, variant: str, amp: str):
    """(step function, its parameters) for one variant at the model's head shape: hidden [N, H] → loss, backward."""
    from graphllm.models import PRESETS

    cfg = PRESETS[args.model]()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(args.seed)
    n, h_dim, v = args.batch * args.seq, cfg.hidden_size, cfg.vocab_size
    w = torch.nn.Parameter((torch.randn(v, h_dim, generator=g) * 0.02).to(device))
    h0 = torch.randn(n, h_dim, generator=g).to(device)
    y = torch.randint(0, v, (n,), generator=g).to(device)
    fn = head_loss(variant)
    if not args.eager:
        fn = torch.compile(fn, fullgraph=True)

    def step():
        w.grad = None
        h = h0.clone().requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
            loss = fn(h, w, y)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss

    return step, w


def head_child(args: argparse.Namespace) -> None:
    """One variant alone: its peak over `--reps` forward+backward steps (printed as JSON)."""
    device = torch.device(args.device)
    step, w = _head_setup(args, args.head_child, args.amp[0])
    for _ in range(2):
        step()
    w.grad = None
    base = _clear_peak(device)
    for _ in range(args.reps):
        loss = step()
    print(json.dumps({"peak_delta": _peak(device) - base, "loss": loss.item()}))


def bench_head(amp: str, args: argparse.Namespace, console: Console) -> dict:
    import time

    from graphllm.models import PRESETS

    cfg = PRESETS[args.model]()
    n = args.batch * args.seq
    torch._dynamo.reset()
    steps = {v: _head_setup(args, v, amp)[0] for v in args.variants}
    times: dict[str, list[tuple[int, float]]] = {v: [] for v in args.variants}
    for v, step in steps.items():  # compile and warm up
        step(), step()
    for r, order in enumerate(interleave(list(args.variants), args.rounds)):
        for v in order:
            for _ in range(args.reps):
                t0 = time.perf_counter()
                steps[v]()
                times[v].append((r, time.perf_counter() - t0))
    del steps
    gc.collect()
    torch._dynamo.reset()
    extra = ["--amp", amp, "--reps", str(args.reps)] + (["--eager"] if args.eager else [])
    rows = {v: {"median_s": median([t for _, t in times[v]]),
                "vs_unfused_rounds": [median([t for q, t in times[v] if q == r])
                                      / median([t for q, t in times["unfused"] if q == r]) for r in range(args.rounds)]
                if "unfused" in times else [],
                **_child(args, ["--head-child", v, *extra])} for v in args.variants}
    res = {"model": args.model, "amp": amp, "device": args.device, "tokens": n, "hidden": cfg.hidden_size,
           "vocab": cfg.vocab_size, "chunks": CHUNKS, "mode": "eager" if args.eager else "inductor", "variants": rows,
           "bytes": {"logits_fp32": n * cfg.vocab_size * 4, "grad_weight_fp32": cfg.vocab_size * cfg.hidden_size * 4}}
    t = Table(title=f"LM head + loss alone, {args.model} ({n} × {cfg.hidden_size} × {cfg.vocab_size}), {amp}, "
                    f"{res['mode']}, {args.device}")
    for col in ("variant", "peak Δ (incl. grad W)", "median fwd+bwd", "÷ unfused (rounds)", "loss"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for v, r in rows.items():
        ratio = (f"{median(r['vs_unfused_rounds']):.2f} ({min(r['vs_unfused_rounds']):.2f}–"
                 f"{max(r['vs_unfused_rounds']):.2f})") if r["vs_unfused_rounds"] else ""
        peak = fmt_mib(r["peak_delta"]) if "peak_delta" in r else f"error: {r.get('error')}"
        t.add_row(v, peak, f"{r['median_s'] * 1e3:.1f} ms", ratio, f"{r['loss']:.6f}" if "loss" in r else "")
    console.print(t)
    console.print(f"for scale: fp32 logits {fmt_mib(res['bytes']['logits_fp32'])}, fp32 grad W "
                  f"{fmt_mib(res['bytes']['grad_weight_fp32'])}; time: {args.rounds} interleaved rounds of {args.reps} "
                  "steps per variant in this process; peak: each variant alone in a subprocess")
    return res


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from graphllm.models import PRESETS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["step", "head"], default="step")
    p.add_argument("--model", choices=sorted(PRESETS), default="small-llama")
    p.add_argument("--amp", choices=["fp32", "bf16", "both"], default="both")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps-per-round", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--mem-steps", type=int, default=2, help="steps each memory subprocess measures")
    p.add_argument("--mem-grads", choices=["freed", "kept"], default="freed", help=argparse.SUPPRESS)
    p.add_argument("--no-memory", action="store_true", help="skip the per-contender memory subprocesses")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="--part head")
    p.add_argument("--reps", type=int, default=5, help="--part head: timed steps per variant")
    p.add_argument("--eager", action="store_true", help="--part head: no torch.compile")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--memory-child", choices=CONTENDERS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--head-child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.amp = ["fp32", "bf16"] if args.amp == "both" else [args.amp]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_child:
        return step_memory_child(args)
    if args.head_child:
        return head_child(args)
    console = Console(width=None if sys.stdout.isatty() else 150)
    results = []
    for amp in args.amp:
        if args.part == "head":
            results.append(bench_head(amp, args, console))
        else:
            results.append(bench_step(amp, args, console))
            print_step(results[-1], console)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"argv": sys.argv, "results": results}, indent=1))


if __name__ == "__main__":
    main()
