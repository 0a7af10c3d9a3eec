"""Memory features, with vs without: peak memory and step time of each case against the fp32 baseline.

Cases (CASES, a list: add a row by adding a Case): fp32 parameters and AdamW (baseline); `--amp bf16` (autocast,
fp32 parameters); `--params-dtype bf16` (O2: bf16 parameters, fp32 masters and moments); and each with
`--offload-optimizer` (masters and moments in host memory, streamed through the device for the step);
`--offload-activations attention|all` (saved activations in host memory between forward and backward).

One step = graphllm's engine: forward + backward of the compiled graph, global-norm clipping, the optimizer step,
zero_grad. Step times: every case built in this process, a compiling step and `--warmup` steps each, then
`--rounds` rounds of `--steps-per-round` steps, cases interleaved round-robin and rotated every round (noise from
other processes hits all alike); medians, and the ratio to the baseline per round (median of those).

Memory, per case:
- state bytes: parameters + gradients + optimizer (masters, moments) as the tensors really hold them after a step,
  split into what lives on the device and in host buffers (offload), beside the report's prediction
  (graphllm.report.rank_memory, graphllm.planning.optimizer_memory.optimizer_bytes);
- peak: each case alone in a fresh subprocess (`--child`), the peak over `--steps-per-round` steps minus what the
  process held before building: on CUDA torch.cuda.max_memory_allocated, on CPU the peak RSS (VmHWM). On a CPU host
  and device are one memory: offload moves nothing out of it (its chunk copies cost a little), so expect no saving
  there; the saving is the device-resident optimizer bytes, on CUDA/NPU.

    python benchmarks/memory_features.py --model tiny-llama --json runs/memory_features.json
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` when run as a script
from common import current_rss_bytes, fmt_mib, interleave, median, peak_rss_bytes  # noqa: E402

import torch  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    label: str
    plan: dict = field(default_factory=dict)
    """CompilePlan fields beyond model, shape, backend and device."""


CASES = [
    Case("fp32", "fp32 params + AdamW (baseline)"),
    Case("amp_bf16", "--amp bf16 (autocast, fp32 params)", {"amp": "bf16"}),
    Case("o2", "--params-dtype bf16 (O2)", {"params_dtype": "bf16"}),
    Case("fp32_offload", "fp32 + --offload-optimizer", {"offload_optimizer": True}),
    Case("o2_offload", "O2 + --offload-optimizer", {"params_dtype": "bf16", "offload_optimizer": True}),
    # activation offload (benchmarks/activation_offload.py has its saved/offloaded bytes and per-step peaks)
    Case("act_offload_attention", "--offload-activations attention",
         {"activation_offload": {"activations": "attention"}}),
    Case("act_offload_all", "--offload-activations all", {"activation_offload": {"activations": "all"}}),
]
BASELINE = "fp32"


def build_case(case: Case, args: argparse.Namespace):
    from graphllm.job import build
    from graphllm.plan import CompilePlan
    from graphllm.train import TrainConfig

    from graphllm.planning.offload_config import ActivationOffloadConfig

    fields = {k: ActivationOffloadConfig(**v) if k == "activation_offload" else v for k, v in case.plan.items()}
    plan = CompilePlan(model=args.model, batch_size=args.batch, seq_len=args.seq, backend=args.backend,
                       device=args.device, **fields)
    built = build(plan)
    return built, built.engine.make_optimizer(TrainConfig(lr=1e-4))


def make_batches(vocab: int, args: argparse.Namespace, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device),
             torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)) for _ in range(4)]


def sync(device: str) -> None:
    if device != "cpu":
        torch.accelerator.synchronize()


def step(built, opt, batch, device: str) -> tuple[float, float]:
    """One training step; (seconds, loss)."""
    sync(device)
    t0 = time.perf_counter()
    loss = built.engine.forward_backward(*batch)
    built.engine.clip_grad_norm(1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - t0, loss


def state_bytes(built, opt, batch) -> dict[str, int]:
    """Bytes the parameters, gradients (after a forward/backward) and optimizer tensors really hold, by where the
    optimizer's live (its "home": host buffers when offloaded)."""
    params = built.engine.params
    built.engine.forward_backward(*batch)
    grads = sum(p.grad.nbytes for p in params if p.grad is not None)
    opt.zero_grad(set_to_none=True)
    if hasattr(opt, "segments"):  # graphllm.parallel.master_weights.MasterAdamW
        optim = sum(s.exp_avg.nbytes + s.exp_avg_sq.nbytes + (0 if s.is_view else s.master.nbytes)
                    for s in opt.segments)
        offloaded = opt.offload
    else:
        inner = getattr(opt, "inner", opt)
        optim = sum(v.nbytes for s in inner.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq"))
        offloaded = False
    return {"parameter_bytes": sum(p.nbytes for p in params), "gradient_bytes": grads,
            "optimizer_device_bytes": 0 if offloaded else optim, "optimizer_host_bytes": optim if offloaded else 0}


def child(args: argparse.Namespace) -> None:
    """One case alone: print its peak memory over a few steps, as JSON."""
    case = next(c for c in CASES if c.name == args.child)
    gc.collect()
    before = current_rss_bytes()
    if args.device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    built, opt = build_case(case, args)
    batches = make_batches(built.model.config.vocab_size, args, args.device)
    for i in range(args.steps_per_round):
        step(built, opt, batches[i % len(batches)], args.device)
    peak = (torch.cuda.max_memory_allocated() if args.device != "cpu" else peak_rss_bytes() - before)
    print(json.dumps({"peak_bytes": peak, "kind": "device max_memory_allocated" if args.device != "cpu" else
                      "peak RSS above the process's start"}))


def peak_of(case: Case, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", case.name, "--model", args.model, "--batch", str(args.batch),
           "--seq", str(args.seq), "--backend", args.backend, "--device", args.device,
           "--steps-per-round", str(args.steps_per_round)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench(args: argparse.Namespace) -> dict:
    from graphllm.report import rank_memory

    cases = [c for c in CASES if c.name in args.cases]
    built = {c.name: build_case(c, args) for c in cases}
    vocab = next(iter(built.values()))[0].model.config.vocab_size
    batches = make_batches(vocab, args, args.device)
    times: dict[str, list[float]] = {c.name: [] for c in cases}
    per_round: dict[str, list[float]] = {c.name: [] for c in cases}
    losses = {}
    for c in cases:  # compile, then warm up
        for i in range(1 + args.warmup):
            _, losses[c.name] = step(*built[c.name], batches[i % len(batches)], args.device)
    for order in interleave([c.name for c in cases], args.rounds):
        this_round = {}
        for name in order:
            ts = [step(*built[name], batches[i % len(batches)], args.device)[0] for i in range(args.steps_per_round)]
            times[name] += ts
            this_round[name] = median(ts)
        for name in this_round:
            per_round[name].append(this_round[name] / this_round[BASELINE])
    rows = {}
    for c in cases:
        b, opt = built[c.name]
        predicted = rank_memory(b)
        rows[c.name] = {"label": c.label, "plan": c.plan, "median_step_s": median(times[c.name]),
                        "step_ratio_vs_baseline": median(per_round[c.name]), "last_warmup_loss": losses[c.name],
                        "state": state_bytes(b, opt, batches[0]),
                        "predicted": {k: predicted[k] for k in ("parameter_bytes", "gradient_bytes",
                                                                "optimizer_device_bytes", "optimizer_host_bytes",
                                                                "optimizer_step_bytes")}}
    del built
    gc.collect()
    if not args.no_peak:
        for c in cases:
            rows[c.name]["peak"] = peak_of(c, args)
    return {"model": args.model, "batch": args.batch, "seq": args.seq, "backend": args.backend, "device": args.device,
            "threads": torch.get_num_threads(), "rounds": args.rounds, "steps_per_round": args.steps_per_round,
            "baseline": BASELINE, "cases": rows}


def show(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{res['model']} batch {res['batch']} × seq {res['seq']}, {res['backend']} on {res['device']}, "
                    f"{res['threads']} threads, {res['rounds']}×{res['steps_per_round']} steps")
    for col in ("case", "step (median)", "× baseline", "params", "grads", "optimizer device", "optimizer host",
                "peak"):
        t.add_column(col, justify="left" if col == "case" else "right")
    for r in res["cases"].values():
        s = r["state"]
        t.add_row(r["label"], f"{r['median_step_s'] * 1e3:.1f} ms", f"{r['step_ratio_vs_baseline']:.2f}",
                  fmt_mib(s["parameter_bytes"]), fmt_mib(s["gradient_bytes"]), fmt_mib(s["optimizer_device_bytes"]),
                  fmt_mib(s["optimizer_host_bytes"]), fmt_mib(r["peak"]["peak_bytes"]) if "peak" in r else "-")
    Console().print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--backend", default="eager", help="eager (default: quick to build) or inductor")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", default=",".join(c.name for c in CASES), type=lambda s: s.split(","))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps-per-round", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-peak", action="store_true", help="skip the per-case peak-memory subprocesses")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.child:
        return child(args)
    if BASELINE not in args.cases:
        ap.error(f"--cases must include the baseline {BASELINE}")
    res = bench(args)
    show(res)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
