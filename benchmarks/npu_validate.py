"""Validate graphllm's Ascend backend on an Atlas machine: parity, a profile, and throughput.

Run it on a machine with Ascend CANN and torch_npu (see docs/ascend.md):

    source /usr/local/Ascend/ascend-toolkit/set_env.sh
    python benchmarks/npu_validate.py --model tiny-llama --amp bf16 --steps 20 --out build/npu_validate

1. parity: the same model (`load_model(name, seed=0)`, loaded twice) compiled with backend "eager" on
   CPU in fp32 (the reference) and with backend "npu" on the NPU (with `--amp`); one training step on
   the same batch; loss and every parameter gradient compared by relative error max|a-b| / max|b|.
2. throughput: median step time (forward + backward + fused AdamW from graphllm.train.make_optimizer)
   and tokens/s over `--steps` steps after warm-up, on the NPU model.
3. profile: a few NPU steps under torch_npu.profiler, trace written under `--out/profile/` (open it
   with MindStudio Insight or TensorBoard's torch-tb-profiler-ascend plugin).

A rich summary is printed and everything is written to `--out/npu_validate.json`. Exit codes: 0 all
checks passed, 1 parity out of tolerance, 2 no torch_npu / no NPU / bad arguments.

`--dry-run-cpu` runs the whole script with backend "eager" on CPU on both sides and torch.profiler in
place of torch_npu.profiler: it proves the script's own logic on a machine without an NPU (fp32 parity
is then bitwise).

torch_npu is imported only inside `main`, after `importlib.util.find_spec` finds it: importing it on a
machine without CANN breaks `import torch` itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

import graphllm
from graphllm.train import TrainConfig, make_optimizer

# Relative error max|a-b| / max|b| against the CPU fp32 reference. fp32: the fused NPU kernels (RMSNorm,
# SwiGLU, RoPE, flash attention) reduce in another order than the CPU reference, so not bitwise.
# bf16: autocast rounds every matmul input; the repo's policy for bf16 loss vs fp32 is 2e-2, and
# gradients of small tensors (norm weights) drift further.
TOLERANCES = {"fp32": {"loss": 1e-4, "grad": 2e-3}, "bf16": {"loss": 2e-2, "grad": 5e-2}}
N_BATCHES = 4  # distinct batches the throughput loop cycles through (same shapes: one static graph)
WARMUP_STEPS = 3


class Unavailable(Exception):
    """No torch_npu or no NPU: exit 2 with the message."""


@dataclass
class Target:
    """Where the checked side runs: the NPU with torchair, or (dry run) the CPU with backend eager."""

    device: str
    backend: str
    label: str
    profiler: ModuleType
    """torch_npu.profiler or torch.profiler (same profile/schedule/tensorboard_trace_handler API)."""
    activities: list
    profile_kwargs: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def synchronize(self) -> None:
        mod = getattr(torch, self.device, None)
        if mod is not None and hasattr(mod, "synchronize") and self.device != "cpu":
            mod.synchronize()

    def max_memory_allocated(self) -> int | None:
        mod = getattr(torch, self.device, None)
        if self.device == "cpu" or mod is None or not hasattr(mod, "max_memory_allocated"):
            return None
        return int(mod.max_memory_allocated())


def npu_target() -> Target:
    if importlib.util.find_spec("torch_npu") is None:
        raise Unavailable("torch_npu is not installed: this script validates graphllm on an Ascend NPU. Install "
                          "CANN and `pip install -e '.[npu]'` (docs/ascend.md), or run with --dry-run-cpu to check "
                          "the script's logic on CPU")
    try:
        import torch_npu  # noqa: F401  (registers the npu device)
    except Exception as e:  # without CANN's libraries the import fails in many ways
        raise Unavailable(f"torch_npu is installed but cannot be imported ({type(e).__name__}: {e}); run "
                          "`source /usr/local/Ascend/ascend-toolkit/set_env.sh` first and check that the CANN "
                          "toolkit and kernels match the torch_npu release (docs/ascend.md)") from e
    if not torch.npu.is_available():
        raise Unavailable("torch_npu imported but torch.npu.is_available() is False: no NPU visible to this "
                          "process (check npu-smi info and ASCEND_RT_VISIBLE_DEVICES)")
    import torch_npu.profiler as npu_profiler

    experimental = npu_profiler._ExperimentalConfig(profiler_level=npu_profiler.ProfilerLevel.Level1,
                                                    aic_metrics=npu_profiler.AiCMetrics.PipeUtilization)
    return Target(device="npu", backend="npu", label=f"npu ({torch.npu.get_device_name(0)})", profiler=npu_profiler,
                  activities=[npu_profiler.ProfilerActivity.CPU, npu_profiler.ProfilerActivity.NPU],
                  profile_kwargs={"experimental_config": experimental},
                  versions={"torch_npu": getattr(torch_npu, "__version__", "?")})


def cpu_dry_target() -> Target:
    import torch.profiler as cpu_profiler

    return Target(device="cpu", backend="eager", label="cpu eager (dry run)", profiler=cpu_profiler,
                  activities=[cpu_profiler.ProfilerActivity.CPU])


def make_batches(vocab: int, batch: int, seq: int, seed: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random tokens; labels aligned (labels[:, t] is the token after input_ids[:, t])."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tok = torch.randint(0, vocab, (batch, seq + 1), generator=g)  # [B, S+1]
        out.append((tok[:, :-1].contiguous(), tok[:, 1:].contiguous()))
    return out


@dataclass
class Side:
    model: torch.nn.Module
    compiled: graphllm.CompiledModel
    loss: float
    grads: dict[str, torch.Tensor]
    first_step_s: float
    """Compile (Dynamo + aot_autograd + backend) plus the first forward and backward."""


def one_step(name: str, device: str, backend: str, amp: str, batch: tuple[torch.Tensor, torch.Tensor],
             seq_len: int, dump_dir: Path | None, sync: Callable[[], None]) -> Side:
    model = graphllm.load_model(name, seed=0)
    if seq_len > model.config.max_position_embeddings:
        raise Unavailable(f"--seq-len {seq_len} exceeds {name}'s max_position_embeddings "
                          f"{model.config.max_position_embeddings}")
    model = model.to(device)
    ids, labels = (t.to(device) for t in batch)
    t0 = time.perf_counter()
    compiled = graphllm.compile(model, ids, labels, backend=backend, amp=amp, dump_dir=dump_dir)
    loss = compiled(ids, labels)
    loss.backward()
    sync()
    first = time.perf_counter() - t0
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        raise RuntimeError(f"{device}/{backend}: no gradient for {', '.join(missing[:5])}")
    return Side(model=model, compiled=compiled, loss=float(loss.detach().float().cpu()), grads=grads,
                first_step_s=first)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a-b| / max|b| (b the reference); 0 when both are all zero."""
    denom = b.abs().max().item()
    diff = (a - b).abs().max().item()
    if denom == 0:
        return 0.0 if diff == 0 else math.inf
    return diff / denom


def parity(ref: Side, test: Side, amp: str, rtol_loss: float, rtol_grad: float) -> dict[str, Any]:
    loss_err = abs(test.loss - ref.loss) / max(abs(ref.loss), 1e-12)
    per_param = {n: rel_err(test.grads[n], g) for n, g in ref.grads.items()}
    worst = sorted(per_param.items(), key=lambda kv: kv[1], reverse=True)
    failing = [n for n, e in per_param.items() if not e <= rtol_grad]  # NaN fails too
    ref_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in ref.grads.values()))
    test_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in test.grads.values()))
    finite = math.isfinite(test.loss) and all(torch.isfinite(g).all() for g in test.grads.values())
    ok = finite and loss_err <= rtol_loss and not failing
    return {
        "ok": bool(ok), "amp": amp, "finite": bool(finite),
        "loss_ref": ref.loss, "loss_test": test.loss, "loss_rel_err": loss_err, "rtol_loss": rtol_loss,
        "grad_norm_ref": ref_norm, "grad_norm_test": test_norm,
        "grad_norm_rel_err": abs(test_norm - ref_norm) / max(ref_norm, 1e-12),
        "grads_compared": len(per_param), "rtol_grad": rtol_grad, "grads_over_tol": failing,
        "worst_grads": [{"param": n, "rel_err": e} for n, e in worst[:5]],
        "first_step_s": {"ref": ref.first_step_s, "test": test.first_step_s},
    }


def train_step_fn(side: Side, target: Target, batches: list[tuple[torch.Tensor, torch.Tensor]]):
    """Returns (step(i) -> loss, optimizer description). Fused AdamW as graphllm run uses it; falls back
    to the unfused one (and says so) if the device has no fused kernel."""
    cfg = TrainConfig()
    model = side.model
    model.zero_grad(set_to_none=True)
    on_device = [(x.to(target.device), y.to(target.device)) for x, y in batches]
    state = {"opt": None, "desc": "AdamW(fused=True) via graphllm.train.make_optimizer"}
    try:
        state["opt"] = make_optimizer(model, cfg)
    except (RuntimeError, ValueError) as e:
        state["opt"] = _unfused(model, cfg)
        state["desc"] = f"AdamW(fused=False): make_optimizer failed ({e})"

    def step(i: int) -> float:
        x, y = on_device[i % len(on_device)]
        loss = side.compiled(x, y)
        loss.backward()
        try:
            state["opt"].step()
        except (RuntimeError, NotImplementedError) as e:
            if "fused=False" in state["desc"]:
                raise
            state["opt"] = _unfused(model, cfg)
            state["desc"] = f"AdamW(fused=False): fused step failed ({str(e).splitlines()[0]})"
            state["opt"].step()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    return step, state


def _unfused(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=False)


def throughput(step: Callable[[int], Any], target: Target, steps: int, tokens: int) -> dict[str, Any]:
    for i in range(WARMUP_STEPS):
        step(i)
    target.synchronize()
    times, losses = [], []
    for i in range(steps):
        t0 = time.perf_counter()
        loss = step(WARMUP_STEPS + i)
        target.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.float().cpu()))
    med = statistics.median(times)
    return {"steps": steps, "warmup_steps": WARMUP_STEPS, "median_step_s": med, "min_step_s": min(times),
            "max_step_s": max(times), "tokens_per_step": tokens, "tokens_per_s": tokens / med,
            "loss_first": losses[0], "loss_last": losses[-1], "finite": all(math.isfinite(x) for x in losses),
            "max_memory_allocated": target.max_memory_allocated()}


def profile_steps(step: Callable[[int], Any], target: Target, steps: int, out: Path) -> dict[str, Any]:
    prof_mod = target.profiler
    trace_dir = out / "profile"
    trace_dir.mkdir(parents=True, exist_ok=True)
    with prof_mod.profile(activities=target.activities,
                          schedule=prof_mod.schedule(wait=0, warmup=1, active=steps, repeat=1),
                          on_trace_ready=prof_mod.tensorboard_trace_handler(str(trace_dir)),
                          record_shapes=True, profile_memory=True, **target.profile_kwargs) as prof:
        for i in range(steps + 1):
            step(i)
            target.synchronize()
            prof.step()
    files = sorted(str(p.relative_to(out)) for p in trace_dir.rglob("*") if p.is_file())
    return {"profiler": prof_mod.__name__, "active_steps": steps, "dir": str(trace_dir), "files": files[:20],
            "n_files": len(files)}


def summary_table(result: dict[str, Any]):
    from rich.table import Table

    t = Table(title=f"graphllm {result['target']} — {result['model']} {result['batch_size']}×{result['seq_len']} "
                    f"amp={result['amp']}")
    t.add_column("check")
    t.add_column("value", justify="right")
    t.add_column("status")
    p = result["parity"]
    mark = lambda ok: "[green]ok[/]" if ok else "[red]FAIL[/]"  # noqa: E731
    t.add_row("loss ref (cpu eager fp32)", f"{p['loss_ref']:.6f}", "")
    t.add_row(f"loss {result['target']}", f"{p['loss_test']:.6f}", "")
    t.add_row("loss rel err", f"{p['loss_rel_err']:.2e}", f"{mark(p['loss_rel_err'] <= p['rtol_loss'])} "
              f"(tol {p['rtol_loss']:.0e})")
    w = p["worst_grads"][0] if p["worst_grads"] else {"param": "-", "rel_err": 0.0}
    t.add_row(f"worst grad rel err ({p['grads_compared']} tensors)", f"{w['rel_err']:.2e}",
              f"{mark(not p['grads_over_tol'])} (tol {p['rtol_grad']:.0e}; {len(p['grads_over_tol'])} over) "
              f"{w['param']}")
    t.add_row("grad norm ref / test", f"{p['grad_norm_ref']:.4f} / {p['grad_norm_test']:.4f}",
              f"rel {p['grad_norm_rel_err']:.1e}")
    t.add_row("compile + first step (s)", f"{p['first_step_s']['test']:.1f}", "")
    if "throughput" in result:
        th = result["throughput"]
        t.add_row("median step (ms)", f"{th['median_step_s'] * 1e3:.2f}",
                  f"min {th['min_step_s'] * 1e3:.2f}, max {th['max_step_s'] * 1e3:.2f}")
        t.add_row("tokens/s", f"{th['tokens_per_s']:,.0f}", result["optimizer"])
        t.add_row("loss first → last", f"{th['loss_first']:.4f} → {th['loss_last']:.4f}", mark(th["finite"]))
        if th["max_memory_allocated"] is not None:
            t.add_row("peak memory allocated", f"{th['max_memory_allocated'] / 2**20:,.0f} MiB", "")
    if "profile" in result:
        pr = result["profile"]
        t.add_row("profile", f"{pr['n_files']} files", pr["dir"])
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-llama", help="preset (tiny-llama, small-llama) or HF checkpoint dir")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--amp", choices=["fp32", "bf16"], default="bf16",
                    help="precision of the checked side (the CPU reference is always fp32)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps for throughput (after warm-up)")
    ap.add_argument("--profile-steps", type=int, default=3, help="profiled steps (0: no profile)")
    ap.add_argument("--out", type=Path, default=Path("build/npu_validate"), help="JSON, profile and dumps go here")
    ap.add_argument("--seed", type=int, default=0, help="data seed (weights always use seed 0)")
    ap.add_argument("--rtol-loss", type=float, default=None, help="override the loss tolerance for --amp")
    ap.add_argument("--rtol-grad", type=float, default=None, help="override the gradient tolerance for --amp")
    ap.add_argument("--dump", action="store_true", help="write graphllm's per-pass graph dumps under --out/graphs")
    ap.add_argument("--dry-run-cpu", action="store_true",
                    help="no NPU: run every step with backend eager on CPU (checks the script itself)")
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True)
    if args.batch_size < 1 or args.seq_len < 2 or args.steps < 1 or args.profile_steps < 0:
        console.print("[red]error:[/] --batch-size ≥ 1, --seq-len ≥ 2, --steps ≥ 1, --profile-steps ≥ 0")
        return 2
    try:
        target = cpu_dry_target() if args.dry_run_cpu else npu_target()
    except Unavailable as e:
        console.print(f"[red]npu_validate:[/] {escape(str(e))}")
        return 2

    tol = dict(TOLERANCES[args.amp])
    if args.rtol_loss is not None:
        tol["loss"] = args.rtol_loss
    if args.rtol_grad is not None:
        tol["grad"] = args.rtol_grad
    args.out.mkdir(parents=True, exist_ok=True)
    vocab = graphllm.load_model(args.model, seed=0).config.vocab_size
    batches = make_batches(vocab, args.batch_size, args.seq_len, args.seed, N_BATCHES)

    console.print(f"[bold]parity[/]: cpu eager fp32 vs {target.label} amp={args.amp} on one batch")
    try:
        ref = one_step(args.model, "cpu", "eager", "fp32", batches[0], args.seq_len,
                       args.out / "graphs" / "ref" if args.dump else None, lambda: None)
        test = one_step(args.model, target.device, target.backend, args.amp, batches[0], args.seq_len,
                        args.out / "graphs" / "test" if args.dump else None, target.synchronize)
    except Unavailable as e:
        console.print(f"[red]npu_validate:[/] {escape(str(e))}")
        return 2
    result: dict[str, Any] = {
        "target": target.label, "device": target.device, "backend": target.backend, "dry_run_cpu": args.dry_run_cpu,
        "model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len, "amp": args.amp,
        "versions": {"graphllm": graphllm.__version__, "torch": torch.__version__, **target.versions},
        "parity": parity(ref, test, args.amp, tol["loss"], tol["grad"]),
        "compile_counts": test.compiled.compile_counts,
    }
    del ref

    console.print(f"[bold]throughput[/]: {args.steps} steps after {WARMUP_STEPS} warm-up")
    step, opt_state = train_step_fn(test, target, batches)
    result["throughput"] = throughput(step, target, args.steps, args.batch_size * args.seq_len)
    result["optimizer"] = opt_state["desc"]
    if args.profile_steps:
        console.print(f"[bold]profile[/]: {args.profile_steps} steps with {target.profiler.__name__}")
        result["profile"] = profile_steps(step, target, args.profile_steps, args.out)
    result["compile_counts_after"] = test.compiled.compile_counts
    recompiled = result["compile_counts_after"] != result["compile_counts"]
    result["recompiled"] = recompiled

    (args.out / "npu_validate.json").write_text(json.dumps(result, indent=2, default=str))
    Console().print(summary_table(result))
    if recompiled:
        console.print(f"[yellow]warning:[/] graphs recompiled during training: {result['compile_counts']} → "
                      f"{result['compile_counts_after']}")
    console.print(f"wrote {args.out / 'npu_validate.json'}")
    ok = result["parity"]["ok"] and result["throughput"]["finite"]
    if not ok:
        console.print("[red]parity FAILED[/]: see parity.worst_grads / grads_over_tol in the JSON; fp32 on NPU may "
                      "use HF32 matmuls (torch.npu.matmul.allow_hf32) — compare with --amp fp32 and docs/ascend.md")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
