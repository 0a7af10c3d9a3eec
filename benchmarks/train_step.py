"""Training-step benchmark: graphllm vs Hugging Face transformers eager vs torch.compile(HF).

One step = zero_grad + forward + loss + backward + optimizer step, on the same config, weights, data
and dtype for all three contenders; each contender has its own copy of the weights and its own fused
AdamW (same param groups and hyper-parameters). The contenders are interleaved round-robin in this
one process: a first (compiling) step each, warm-up steps, then `--rounds` rounds of
`--steps-per-round` steps each, with the order rotated every round. Reported figures are medians over
the steady steps; compile time is first step minus a steady step (plus graphllm's capture/passes,
which run eagerly in `graphllm.compile`). The matmul peak is probed inside the same rounds.

Peak RSS is measured per contender in a separate short subprocess (`--rss-child`), because this
process holds all three contenders at once.

    python benchmarks/train_step.py --models tiny-llama small-llama --amp fp32 --json runs/bench.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` when run as a script
from common import (  # noqa: E402
    MatmulProbe, Stopwatch, current_rss_bytes, ensure_inductor_cache, fmt_mib, fmt_rate, interleave, median,
    peak_rss_bytes, ru_maxrss_bytes, timed,
)

CACHE_DIR, CACHE_WARM = ensure_inductor_cache()  # before torch reads its inductor config

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch import nn  # noqa: E402

import graphllm  # noqa: E402
from graphllm.planning.flops import forward_flops  # noqa: E402
from graphllm.models import PRESETS, load_model  # noqa: E402
from graphllm.train import TrainConfig, make_optimizer  # noqa: E402

SHAPES = {"tiny-llama": (4, 256), "small-llama": (1, 512)}
"""Default (batch, seq) per model; small-llama's 1×512 is fixed by the issue."""
STEPS_PER_ROUND = {"tiny-llama": 8, "small-llama": 2}
"""Default steps per contender per round: ~1 s of each contender per round on this kind of machine."""
CONTENDERS = ("graphllm", "hf-eager", "hf-compile")
LABELS = {"graphllm": "graphllm (inductor)", "hf-eager": "HF eager (sdpa)", "hf-compile": "torch.compile(HF)"}
LOSS_RTOL = {"fp32": 1e-4, "bf16": 2e-2}
"""First-step loss agreement: fp32 differs only in reduction order and fusion (~1e-6 seen; 1e-4 leaves
room for a 32k-vocab logsumexp); bf16 autocast rounds every matmul input, and the three sides may
place casts differently (~1e-3 typical)."""
AMP_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}
N_BATCHES = 4  # distinct batches cycled through; the same sequence for every contender


def host_kind() -> str:
    """The CPU model and its bf16 matmul support (from /proc/cpuinfo): AMX tiles make bf16 GEMMs several times
    faster than fp32, avx512_bf16 alone about twice, neither: bf16 is converted to fp32 inside the GEMM."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    bf16 = [f for f in ("amx_bf16", "avx512_bf16") if f in flags] or ["no bf16 instructions"]
    return f"{model} ({', '.join(bf16)}; {os.cpu_count()} CPUs)"


# ---------------------------------------------------------------- contenders


@dataclass
class Contender:
    """One side of the comparison: its own weights (`module`), loss function and optimizer."""

    name: str
    module: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    opt: torch.optim.Optimizer
    prepare_s: float
    """Time spent building it before the first step (graphllm: capture + passes; others: ~0)."""
    compiled: object | None = None
    steps: list[dict] = field(default_factory=list)
    next_batch: int = 0
    sync: Callable[[], object] = lambda: None
    """Waits for queued device work before each lap (torch.cuda.synchronize on a GPU; nothing on the CPU)."""

    def step(self, batches: list[tuple[torch.Tensor, torch.Tensor]], tag: str) -> dict:
        x, y = batches[self.next_batch % len(batches)]
        self.next_batch += 1
        sw = Stopwatch()
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(x, y)
        self.sync()
        sw.lap("fwd")  # zero_grad + forward + loss
        loss.backward()
        self.sync()
        sw.lap("bwd")
        self.opt.step()
        self.sync()
        sw.lap("opt")
        rec = {"tag": tag, "total": sw.total, **sw.laps, "loss": loss.item()}
        self.steps.append(rec)
        return rec


def make_batches(vocab: int, batch: int, seq: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random tokens; labels are already aligned (labels[:, t] is the token after input_ids[:, t])."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(N_BATCHES):
        tok = torch.randint(0, vocab, (batch, seq + 1), generator=g)  # [B, S+1]
        out.append((tok[:, :-1].contiguous(), tok[:, 1:].contiguous()))  # [B, S], [B, S]
    return out


def hf_adamw(model: nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """What HF Trainer's default `adamw_torch_fused` builds, with graphllm's groups and hyper-parameters:
    decay on matrices, none on norms/biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps, fused=True)


def hf_model_like(source: nn.Module) -> nn.Module:
    """transformers' LlamaForCausalLM with the source's config and exactly its weights (checked)."""
    cfg = transformers.LlamaConfig(**source.config.to_hf(), attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(cfg).to(torch.float32)
    src = source.state_dict()
    missing, unexpected = hf.load_state_dict(src, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"HF state dict differs from graphllm's: missing {missing}, unexpected {unexpected}")
    hf_sd = hf.state_dict()
    bad = [k for k, v in src.items() if not torch.equal(hf_sd[k], v)]
    if bad or not torch.equal(hf.model.rotary_emb.inv_freq, source.model.inv_freq):
        raise RuntimeError(f"HF weights differ from graphllm's after loading: {bad or ['rotary inv_freq']}")
    return hf.train()


def hf_loss_fn(forward: Callable, amp: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    dtype = AMP_DTYPE[amp]

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=dtype, enabled=amp != "fp32"):
            logits = forward(input_ids=x, use_cache=False).logits  # [B, S, V]
            return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    return loss_fn


def build(name: str, source: nn.Module, example: tuple[torch.Tensor, torch.Tensor], amp: str,
          disable: tuple[str, ...] = ()) -> Contender:
    """Contender `name` with its own copy of `source`'s weights, on the device of `example`; `disable`:
    graphllm passes to leave out (an A/B of one pass)."""
    tc = TrainConfig()
    device = example[0].device
    if name == "graphllm":
        model = copy.deepcopy(source).to(device)
        compiled, dt = timed(lambda: graphllm.compile(model, example[0], example[1], backend="inductor", amp=amp,
                                                          disable=disable))
        return Contender(name, model, compiled, make_optimizer(model, tc), dt, compiled=compiled)
    hf = hf_model_like(source).to(device)
    if name == "hf-eager":
        return Contender(name, hf, hf_loss_fn(hf, amp), hf_adamw(hf, tc), 0.0)
    if name == "hf-compile":
        compiled, dt = timed(lambda: torch.compile(hf))
        return Contender(name, hf, hf_loss_fn(compiled, amp), hf_adamw(hf, tc), dt, compiled=compiled)
    raise ValueError(f"unknown contender {name!r}; choose one of {', '.join(CONTENDERS)}")


# ---------------------------------------------------------------- one (model, amp) configuration


def shape_for(model_name: str, args: argparse.Namespace) -> tuple[int, int]:
    b, s = SHAPES.get(model_name, (1, 512))
    return args.batch or b, args.seq or s


def bench_config(model_name: str, amp: str, args: argparse.Namespace, console: Console) -> dict:
    torch._dynamo.reset()  # fresh Dynamo caches: the HF forward recompiled for a new shape would go dynamic
    gc.collect()
    batch, seq = shape_for(model_name, args)
    steps_per_round = args.steps_per_round or STEPS_PER_ROUND.get(model_name, 2)
    source = load_model(model_name, seed=args.seed)
    cfg = source.config
    batches = make_batches(cfg.vocab_size, batch, seq, args.seed)
    names = CONTENDERS + (("graphllm-ab",) if args.graphllm_disable else ())
    LABELS["graphllm-ab"] = f"graphllm without {', '.join(args.graphllm_disable)}"
    contenders = {n: build(n, source, batches[0], amp) for n in CONTENDERS}
    if args.graphllm_disable:  # the A/B of a pass: graphllm without it, interleaved with the rest
        contenders["graphllm-ab"] = build("graphllm", source, batches[0], amp, tuple(args.graphllm_disable))
    flops_step = 3 * forward_flops(contenders["graphllm"].compiled.result.model_graph)
    tokens = batch * seq

    probe_dtypes = [torch.float32] + ([torch.bfloat16] if amp == "bf16" else [])
    probes = []
    for dt in probe_dtypes:
        tag = "fp32" if dt == torch.float32 else "bf16"
        probes.append(MatmulProbe(f"{tag} 2048x2048x2048", 2048, 2048, 2048, dt))
        probes.append(MatmulProbe(f"{tag} lm_head {tokens}x{cfg.hidden_size}x{cfg.vocab_size}",
                                  tokens, cfg.hidden_size, cfg.vocab_size, dt))

    console.print(f"[bold]{model_name}[/] amp={amp}: batch {batch} × seq {seq} = {tokens} tokens/step, "
                  f"{source.num_params() / 1e6:.1f}M params, {flops_step / 1e9:.1f} GFLOP/step (graphllm graph ×3), "
                  f"{torch.get_num_threads()} threads; compiling (first steps)…")
    # first step (compiles) and warm-up, interleaved like the rounds
    for name in names:
        contenders[name].step(batches, "first")
    for _ in range(args.warmup):
        for name in names:
            contenders[name].step(batches, "warmup")
    # steady rounds, with the matmul probe as one more participant
    for r, order in enumerate(interleave(list(names) + ["matmul"], args.rounds)):
        for name in order:
            if name == "matmul":
                for p in probes:
                    p.run(args.probe_reps)
                continue
            for _ in range(steps_per_round):
                contenders[name].step(batches, f"round{r}")
        console.print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {median([s['total'] for s in contenders[n].steps if s['tag'] == f'round{r}']):.3f}s"
            for n in names))

    result = summarize(model_name, amp, batch, seq, source, flops_step, contenders, probes, args)
    result["steps_per_round"] = steps_per_round
    result["host"], result["load_avg_after"] = host_kind(), os.getloadavg()
    del contenders, source
    gc.collect()
    torch._dynamo.reset()
    if not args.no_rss:
        result["rss"] = {n: rss_in_subprocess(n, model_name, amp, args) for n in CONTENDERS}
    return result


def summarize(model_name, amp, batch, seq, source, flops_step, contenders, probes, args) -> dict:
    tokens = batch * seq
    peaks = {p.label: p.median_flops_per_s for p in probes}
    run_tag = "fp32" if amp == "fp32" else "bf16"
    ref_peak = max(v for k, v in peaks.items() if k.startswith(run_tag))
    steady = {n: [s for s in c.steps if s["tag"].startswith("round")] for n, c in contenders.items()}
    med = {n: median([s["total"] for s in st]) for n, st in steady.items()}

    def per_round_ratio(n: str, base: str) -> list[float]:
        out = []
        for r in range(args.rounds):
            tb = median([s["total"] for s in steady[base] if s["tag"] == f"round{r}"])
            tn = median([s["total"] for s in steady[n] if s["tag"] == f"round{r}"])
            out.append(tb / tn)
        return out

    first_loss = {n: c.steps[0]["loss"] for n, c in contenders.items()}
    second_loss = {n: c.steps[1]["loss"] for n, c in contenders.items() if len(c.steps) > 1}
    ref = first_loss["hf-eager"]
    rel = {n: abs(v - ref) / abs(ref) for n, v in first_loss.items()}
    rows = {}
    for n, c in contenders.items():
        st = steady[n]
        parts = {k: median([s[k] for s in st]) for k in ("fwd", "bwd", "opt")}
        rows[n] = {
            "median_step_s": med[n],
            "min_step_s": min(s["total"] for s in st),
            "max_step_s": max(s["total"] for s in st),
            "steps": len(st),
            "tokens_per_s": tokens / med[n],
            "vs_hf_eager": med["hf-eager"] / med[n],
            "vs_hf_eager_rounds": per_round_ratio(n, "hf-eager"),
            "vs_hf_compile": med["hf-compile"] / med[n],
            "vs_hf_compile_rounds": per_round_ratio(n, "hf-compile"),
            "flops_per_s": flops_step / med[n],
            "fraction_of_peak": flops_step / med[n] / ref_peak,
            "split_s": parts,
            "opt_fraction": parts["opt"] / med[n],
            "first_step_s": c.steps[0]["total"],
            "prepare_s": c.prepare_s,
            "compile_s": c.prepare_s + c.steps[0]["total"] - med[n],
            "first_loss": first_loss[n],
            "first_loss_rel_diff_vs_hf_eager": rel[n],
            "second_loss": second_loss.get(n),
            "step_times_s": [s["total"] for s in st],
        }
    return {
        "model": model_name, "amp": amp, "batch": batch, "seq": seq, "tokens_per_step": tokens,
        "params": source.num_params(), "flops_per_step": flops_step, "threads": torch.get_num_threads(),
        "rounds": args.rounds, "warmup": args.warmup,
        "inductor_cache": str(CACHE_DIR), "inductor_cache_warm_at_start": CACHE_WARM,
        "matmul_peaks_flops_per_s": peaks, "reference_peak": ref_peak, "reference_peak_dtype": run_tag,
        "loss_check": {"rtol": LOSS_RTOL[amp], "ok": max(rel.values()) <= LOSS_RTOL[amp], "first": first_loss,
                       "second": second_loss},
        "contenders": rows,
    }


# ---------------------------------------------------------------- peak RSS, one subprocess per contender


def rss_in_subprocess(name: str, model_name: str, amp: str, args: argparse.Namespace) -> dict:
    batch, seq = shape_for(model_name, args)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", name, "--models", model_name,
           "--amp", amp, "--batch", str(batch), "--seq", str(seq), "--seed", str(args.seed),
           "--rss-steps", str(args.rss_steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rss_child(args: argparse.Namespace) -> None:
    model_name, amp = args.models[0], args.amp
    batch, seq = shape_for(model_name, args)
    source = load_model(model_name, seed=args.seed)  # the shared weight source, like in the main run
    batches = make_batches(source.config.vocab_size, batch, seq, args.seed)
    gc.collect()
    before = current_rss_bytes()
    c = build(args.rss_child, source, batches[0], amp)
    for _ in range(args.rss_steps):
        c.step(batches, "rss")
    print(json.dumps({"rss_before": before, "peak_delta": peak_rss_bytes() - before,
                      "steady_delta": current_rss_bytes() - before, "steps": args.rss_steps,
                      "ru_maxrss": ru_maxrss_bytes(), "vmhwm": peak_rss_bytes()}))


# ---------------------------------------------------------------- output


def print_config(res: dict, console: Console) -> None:
    console.rule(f"[bold]{res['model']}  amp={res['amp']}")
    console.print(f"batch {res['batch']} × seq {res['seq']} = {res['tokens_per_step']} tokens/step · "
                  f"{res['params'] / 1e6:.1f}M params · {res['flops_per_step'] / 1e9:.1f} GFLOP/step "
                  f"(graphllm model graph forward matmul FLOPs ×3, same count for all) · {res['threads']} threads · "
                  f"{res['rounds']} rounds × {res['steps_per_round']} steps after {res['warmup']} warm-up · "
                  f"inductor cache {res['inductor_cache']} ({'had entries' if res['inductor_cache_warm_at_start'] else 'empty'}"
                  f" when this process started) · host {res['host']}, load average after the rounds "
                  + " / ".join(f"{x:.2f}" for x in res["load_avg_after"]) + " (1/5/15 min)")
    t = Table(title="matmul peak, measured inside the rounds (median)")
    t.add_column("probe (m×k×n, x @ wᵀ)")
    t.add_column("median", justify="right")
    for k, v in res["matmul_peaks_flops_per_s"].items():
        t.add_row(k, fmt_rate(v))
    console.print(t)
    console.print(f"reference peak for the fractions below: {fmt_rate(res['reference_peak'])} "
                  f"(best {res['reference_peak_dtype']} probe)")

    t = Table(title=f"train step (zero_grad + fwd + loss + bwd + fused AdamW) — {res['model']} {res['amp']}, medians")
    for col in ("contender", "median step", "tokens/s", "× HF eager (per-round range)",
                "× torch.compile(HF) (range)", "achieved", "% of peak"):
        t.add_column(col, justify="left" if col == "contender" else "right")
    for n, r in res["contenders"].items():
        def ratio(key: str, r: dict = r) -> str:
            rs = r[key + "_rounds"]
            return f"{r[key]:.2f}× ({min(rs):.2f}–{max(rs):.2f})"
        t.add_row(LABELS[n], f"{r['median_step_s']:.3f} s", f"{r['tokens_per_s']:,.0f}", ratio("vs_hf_eager"),
                  ratio("vs_hf_compile"), fmt_rate(r["flops_per_s"]), f"{100 * r['fraction_of_peak']:.1f}%")
    console.print(t)
    t = Table(title="where the step goes (medians over the same steps), and compile")
    for col in ("contender", "steps", "min–max step", "fwd+loss", "bwd", "opt.step", "opt share",
                "first step", "compile"):
        t.add_column(col, justify="left" if col == "contender" else "right")
    for n, r in res["contenders"].items():
        sp = r["split_s"]
        t.add_row(LABELS[n], str(r["steps"]), f"{r['min_step_s']:.3f}–{r['max_step_s']:.3f} s",
                  f"{sp['fwd']:.3f} s", f"{sp['bwd']:.3f} s", f"{sp['opt']:.3f} s",
                  f"{100 * r['opt_fraction']:.1f}%", f"{r['first_step_s']:.1f} s", f"{r['compile_s']:.1f} s")
    console.print(t)
    console.print("ratios: median step of the other side / median step of this one (>1 = this one is faster); "
                  "(rounds) = range of the same ratio per round. compile = prepare + first step − median step "
                  "(graphllm's prepare, capture + passes: "
                  f"{res['contenders']['graphllm']['prepare_s']:.1f} s).")
    lc = res["loss_check"]
    first = ", ".join(f"{LABELS[n]} {v:.6f}" for n, v in lc["first"].items())
    worst = max(r["first_loss_rel_diff_vs_hf_eager"] for r in res["contenders"].values())
    status = "[green]OK[/]" if lc["ok"] else "[red]MISMATCH[/]"
    console.print(f"loss sanity (first step, same weights & data): {first}; max rel diff vs HF eager "
                  f"{worst:.1e} (tol {lc['rtol']:.0e}) {status}")
    if lc["second"]:
        console.print("  second step (after one AdamW update, information only): "
                      + ", ".join(f"{LABELS[n]} {v:.6f}" for n, v in lc["second"].items()))
    if "rss" in res:
        t = Table(title="memory per contender, each in its own subprocess (this process holds all three)")
        for col in ("contender", "peak RSS Δ (incl. compile)", "RSS Δ after steps"):
            t.add_column(col, justify="left" if col == "contender" else "right")
        for n, m in res["rss"].items():
            if "error" in m:
                t.add_row(LABELS[n], f"error: {m['error']}", "")
            else:
                t.add_row(LABELS[n], fmt_mib(m["peak_delta"]), fmt_mib(m["steady_delta"]))
        console.print(t)
        console.print(f"Δ = peak RSS (VmHWM; getrusage ru_maxrss is inherited from this parent process across exec, "
                      f"so it is not used) resp. current RSS after {res['rss'][CONTENDERS[0]].get('steps', '?')} "
                      "steps, minus the RSS before building the contender, in a fresh subprocess per contender: "
                      "weights, grads, AdamW state, activations, compiled code and compile-time memory; inductor's "
                      "C++ compiler subprocesses are not counted.")


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(PRESETS), default=["tiny-llama", "small-llama"],
                   help="presets to benchmark (default: tiny-llama small-llama)")
    p.add_argument("--amp", choices=["fp32", "bf16", "both"], default="fp32",
                   help="fp32, or bf16 autocast (fp32 master weights) for all three sides, or both in turn")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--steps-per-round", type=int, default=None,
                   help="steps of each contender per round (default: tiny-llama 8, small-llama 2)")
    p.add_argument("--warmup", type=int, default=2, help="steps after the first (compiling) one, not counted")
    p.add_argument("--probe-reps", type=int, default=2, help="matmul peak repetitions per probe per round")
    p.add_argument("--batch", type=int, default=None, help="override the per-model batch (tiny 4, small 1)")
    p.add_argument("--seq", type=int, default=None, help="override the per-model sequence (tiny 256, small 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-rss", action="store_true", help="skip the per-contender peak-RSS subprocesses")
    p.add_argument("--rss-steps", type=int, default=3, help="steps each RSS subprocess runs before reading its peak")
    p.add_argument("--json", type=Path, default=None, help="write all results (incl. every step time) here")
    p.add_argument("--graphllm-disable", nargs="*", default=[], metavar="PASS",
                   help="also run graphllm without these passes as a fourth contender, interleaved (an A/B of "
                        "a pass, e.g. fuse_rope under --amp bf16)")
    p.add_argument("--rss-child", choices=CONTENDERS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for flag in ("rounds", "steps_per_round", "probe_reps", "rss_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be ≥ 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        p.error(f"--warmup must be ≥ 0, got {args.warmup}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.rss_child:
        rss_child(args)
        return
    console = Console(width=None if sys.stdout.isatty() else 150)  # rich defaults to 80 columns in a pipe
    amps = ["fp32", "bf16"] if args.amp == "both" else [args.amp]
    console.print(f"$ python {' '.join(sys.argv)}\nhost: {host_kind()}; load average {os.getloadavg()[0]:.2f} at start")
    results = []
    for amp in amps:
        for model_name in args.models:
            res = bench_config(model_name, amp, args, console)
            results.append(res)
            print_config(res, console)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"argv": sys.argv, "results": results}, indent=1))
    if args.json:
        console.print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
