"""Mixture-of-experts training step: graphllm vs HF transformers (expert loop, grouped_mm) vs torch.compile(HF).

The MoE sibling of train_step.py, and it shares that file's machinery (Contender, batches, fused AdamW,
summary and report): one step = zero_grad + forward + loss (cross-entropy + router_aux_loss_coef × the
load-balancing loss, on every side) + backward + fused AdamW, on the same config, weights and data.
Contenders, interleaved round-robin in one process, medians over the steady steps:

- graphllm (inductor): `graphllm.compile(..., backend="inductor")` — router → graphllm::moe_permute →
  graphllm::grouped_matmul ×2 → graphllm::moe_unpermute, one static graph;
- HF eager, expert loop: transformers with `experts_implementation="eager"`, the Python loop over the experts
  that receive tokens (MixtralExperts.forward) — the baseline of the issue's 1.5× target;
- HF eager, grouped_mm: transformers 5's default experts implementation, `torch._grouped_mm` (which has a
  CPU kernel since torch 2.9);
- torch.compile(HF): the default HF model under torch.compile; under Dynamo with fp32 weights transformers
  routes the experts to its own opaque custom op (transformers::grouped_mm_fallback, a loop).

Sizes (why): a small MoE that a 2-core CPU trains in about a second a step, shaped like the real ones scaled
down — hidden 256, 4 layers, GQA 8/4 (tiny-llama's attention), vocab 8000, batch 4 × seq 256 = 1024 tokens.
Qwen3-MoE-tiny has many narrow experts, 16 of width 256, top-4 (Qwen3-30B-A3B: 128 × 768, top-8);
Mixtral-tiny has few wide ones, 8 of width 704, top-2 (Mixtral 8x7B: 8 × 14336, top-2). Both give each expert
T·k/E = 256 rows on average: the per-expert GEMMs are small, which is where a loop over experts and the
permutation cost the most relative to the math. DeepSeek-V3-tiny (MLA, a shared expert, sigmoid group routing,
a dense first layer; plain top-k over one expert group, so group-limited routing is not needed to run it) runs
when graphllm.models accepts model_type deepseek_v3, and is skipped with a message until then.

    python benchmarks/moe_step.py --models qwen3-moe-tiny mixtral-tiny --json runs/moe_step.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step as ts  # noqa: E402  (sets the inductor cache dir before torch is imported)
from common import (MatmulProbe, current_rss_bytes, fmt_rate, interleave, median, peak_rss_bytes, run_child_json,  # noqa: E402
                    ru_maxrss_bytes, timed)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from rich.console import Console  # noqa: E402

import graphllm  # noqa: E402
from graphllm.errors import GraphllmError  # noqa: E402
from graphllm.models import ModelConfig, load_model  # noqa: E402
from graphllm.planning.flops import forward_flops  # noqa: E402
from graphllm.train import TrainConfig, make_optimizer  # noqa: E402

_ATTN = dict(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
             head_dim=32, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
             tie_word_embeddings=False, output_router_logits=True, router_aux_loss_coef=0.001)
MODELS = {  # HF config.json dicts: the HF side is built from them, graphllm's from the saved checkpoint
    "qwen3-moe-tiny": dict(_ATTN, model_type="qwen3_moe", intermediate_size=704, moe_intermediate_size=256,
                           num_experts=16, num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1,
                           mlp_only_layers=[]),
    "mixtral-tiny": dict(_ATTN, model_type="mixtral", intermediate_size=704, num_local_experts=8,
                         num_experts_per_tok=2, sliding_window=None, router_jitter_noise=0.0),
    "deepseek-v3-tiny": dict(_ATTN, model_type="deepseek_v3", intermediate_size=704, moe_intermediate_size=256,
                             n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1,
                             n_group=1, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                             output_router_logits=False,  # DeepSeek-V3 balances with a router bias, no aux loss
                             q_lora_rank=128, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32,
                             v_head_dim=32, num_key_value_heads=8, head_dim=16),
}
CONTENDERS = ("graphllm", "hf-eager", "hf-grouped", "hf-compile")
ts.LABELS.update({"hf-eager": "HF eager, expert loop", "hf-grouped": "HF eager, grouped_mm",
                  "hf-compile": "torch.compile(HF)"})
DEFAULT_SHAPE = (4, 256)


class Skip(Exception):
    """This model cannot run here yet (the message says why)."""


def hf_reference(name: str, seed: int) -> torch.nn.Module:
    """The HF model of `name`, randomly initialised from `seed` (all weights perturbed so norms are not all 1)."""
    d = dict(MODELS[name])
    cfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.train()


def check_supported(name: str) -> None:
    """Raise Skip when graphllm's config reader refuses this model (e.g. a family that has not landed)."""
    try:
        ModelConfig.from_hf(MODELS[name], source=name)
    except GraphllmError as e:
        raise Skip(f"{name}: graphllm.models does not accept it yet ({e})") from None


def source_pair(name: str, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(graphllm model, HF model) with the same weights: the HF model saved with save_pretrained and read back by
    graphllm's own checkpoint loader (models/moe_weights.py maps the per-expert names)."""
    check_supported(name)
    hf = hf_reference(name, seed)
    with tempfile.TemporaryDirectory(prefix="moe_step_") as d:
        hf.save_pretrained(d)
        ours = load_model(d)
    return ours, hf


def hf_loss_fn(forward, amp: str, coef: float, aux: bool):
    """train_step's HF loss plus transformers' load-balancing loss (what HF's own `labels=` loss adds)."""
    dtype = ts.AMP_DTYPE[amp]

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=dtype, enabled=amp != "fp32"):
            out = forward(input_ids=x, use_cache=False, output_router_logits=aux)
            loss = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())
            aux_loss = getattr(out, "aux_loss", None) if aux else None
            return loss if aux_loss is None else loss + coef * aux_loss
    return loss_fn


def build(name: str, pair: tuple[torch.nn.Module, torch.nn.Module], example, amp: str) -> ts.Contender:
    """Contender `name` with its own copy of the pair's weights."""
    ours, ref = pair
    tc = TrainConfig()
    if name == "graphllm":
        model = copy.deepcopy(ours)
        compiled, dt = timed(lambda: graphllm.compile(model, example[0], example[1], backend="inductor", amp=amp))
        return ts.Contender(name, model, compiled, make_optimizer(model, tc), dt, compiled=compiled)
    hf = copy.deepcopy(ref)
    hf.set_experts_implementation("eager" if name == "hf-eager" else "grouped_mm")
    aux = bool(getattr(hf.config, "output_router_logits", False))
    coef = float(getattr(hf.config, "router_aux_loss_coef", 0.0))
    if name in ("hf-eager", "hf-grouped"):
        return ts.Contender(name, hf, hf_loss_fn(hf, amp, coef, aux), ts.hf_adamw(hf, tc), 0.0)
    if name == "hf-compile":
        compiled, dt = timed(lambda: torch.compile(hf))
        return ts.Contender(name, hf, hf_loss_fn(compiled, amp, coef, aux), ts.hf_adamw(hf, tc), dt, compiled=compiled)
    raise ValueError(f"unknown contender {name!r}; choose one of {', '.join(CONTENDERS)}")


def probes_for(cfg, tokens: int, amp: str) -> list[MatmulProbe]:
    """train_step's matmul peak probes (2048³, the lm_head) plus one expert GEMM at the mean rows per expert."""
    rows = max(1, tokens * cfg.num_experts_per_tok // max(1, cfg.num_experts))
    out = []
    for dt in [torch.float32] + ([torch.bfloat16] if amp == "bf16" else []):
        tag = "fp32" if dt == torch.float32 else "bf16"
        out += [MatmulProbe(f"{tag} 2048x2048x2048", 2048, 2048, 2048, dt),
                MatmulProbe(f"{tag} lm_head {tokens}x{cfg.hidden_size}x{cfg.vocab_size}",
                            tokens, cfg.hidden_size, cfg.vocab_size, dt),
                MatmulProbe(f"{tag} expert gate_up {rows}x{cfg.hidden_size}x{2 * cfg.expert_size}",
                            rows, cfg.hidden_size, 2 * cfg.expert_size, dt)]
    return out


def bench_model(name: str, amp: str, args: argparse.Namespace, console: Console) -> dict:
    torch._dynamo.reset()
    gc.collect()
    batch, seq = args.batch or DEFAULT_SHAPE[0], args.seq or DEFAULT_SHAPE[1]
    pair = source_pair(name, args.seed)
    cfg = pair[0].config
    batches = ts.make_batches(cfg.vocab_size, batch, seq, args.seed)
    names = [n for n in CONTENDERS if n in args.contenders]
    contenders = {n: build(n, pair, batches[0], amp) for n in names}
    flops_step = 3 * forward_flops(contenders["graphllm"].compiled.result.model_graph)
    probes = probes_for(cfg, batch * seq, amp)
    console.print(f"[bold]{name}[/] amp={amp}: batch {batch} × seq {seq} = {batch * seq} tokens/step, "
                  f"{cfg.num_experts} experts top-{cfg.num_experts_per_tok} of width {cfg.expert_size}, "
                  f"{pair[0].num_params() / 1e6:.1f}M params, {flops_step / 1e9:.2f} GFLOP/step (graphllm graph ×3), "
                  f"{torch.get_num_threads()} threads; compiling (first steps)…")
    for n in names:
        contenders[n].step(batches, "first")
    for _ in range(args.warmup):
        for n in names:
            contenders[n].step(batches, "warmup")
    for r, order in enumerate(interleave(names + ["matmul"], args.rounds)):
        for n in order:
            if n == "matmul":
                for p in probes:
                    p.run(args.probe_reps)
                continue
            for _ in range(args.steps_per_round):
                contenders[n].step(batches, f"round{r}")
        console.print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {median([s['total'] for s in contenders[n].steps if s['tag'] == f'round{r}']):.3f}s" for n in names))
    res = ts.summarize(name, amp, batch, seq, pair[0], flops_step, contenders, probes, args)
    res.update(steps_per_round=args.steps_per_round, host=ts.host_kind(), load_avg_after=os.getloadavg(),
               experts={"num_experts": cfg.num_experts, "top_k": cfg.num_experts_per_tok, "width": cfg.expert_size})
    del contenders, pair
    gc.collect()
    torch._dynamo.reset()
    if not args.no_rss:
        res["rss"] = {n: rss_in_subprocess(n, name, amp, args) for n in names}
    return res


def print_quiet_estimate(res: dict, console: Console) -> None:
    """On a shared machine other processes stretch a share of the steps several-fold (eager, with hundreds of
    small OpenMP regions a step, suffers most): the fastest step and the lower quartile of each contender
    estimate the step on a quiet machine, next to the medians above."""
    from rich.table import Table

    rows = {n: sorted(r["step_times_s"]) for n, r in res["contenders"].items()}
    q1 = {n: xs[len(xs) // 4] for n, xs in rows.items()}
    t = Table(title=f"quiet-machine estimate — {res['model']} {res['amp']}: fastest step and lower quartile")
    for col in ("contender", "fastest step", "× HF eager (fastest)", "lower quartile", "× HF eager (quartile)",
                "achieved (fastest)", "% of peak"):
        t.add_column(col, justify="left" if col == "contender" else "right")
    for n, xs in rows.items():
        t.add_row(ts.LABELS[n], f"{xs[0]:.3f} s", f"{rows['hf-eager'][0] / xs[0]:.2f}×", f"{q1[n]:.3f} s",
                  f"{q1['hf-eager'] / q1[n]:.2f}×", fmt_rate(res["flops_per_step"] / xs[0]),
                  f"{100 * res['flops_per_step'] / xs[0] / res['reference_peak']:.1f}%")
    console.print(t)


def rss_in_subprocess(contender: str, name: str, amp: str, args: argparse.Namespace) -> dict:
    return run_child_json([__file__, "--rss-child", contender, "--models", name, "--amp", amp,
                           "--batch", str(args.batch or DEFAULT_SHAPE[0]), "--seq", str(args.seq or DEFAULT_SHAPE[1]),
                           "--seed", str(args.seed), "--rss-steps", str(args.rss_steps)])


def rss_child(args: argparse.Namespace) -> None:
    name = args.models[0]
    batch, seq = args.batch or DEFAULT_SHAPE[0], args.seq or DEFAULT_SHAPE[1]
    pair = source_pair(name, args.seed)
    batches = ts.make_batches(pair[0].config.vocab_size, batch, seq, args.seed)
    gc.collect()
    before = current_rss_bytes()
    c = build(args.rss_child, pair, batches[0], args.amp)
    for _ in range(args.rss_steps):
        c.step(batches, "rss")
    print(json.dumps({"rss_before": before, "peak_delta": peak_rss_bytes() - before,
                      "steady_delta": current_rss_bytes() - before, "steps": args.rss_steps,
                      "ru_maxrss": ru_maxrss_bytes(), "vmhwm": peak_rss_bytes()}))


def profile_model(name: str, args: argparse.Namespace, console: Console) -> None:
    """`--profile N`: profile_step.py's per-op view (self CPU time, grouped) of N steps of each contender."""
    import profile_step as ps
    from rich.table import Table

    import torch._inductor.config as ic

    ic.cpp.enable_kernel_profile = True  # name each generated C++ kernel in the profile
    pair = source_pair(name, args.seed)
    batches = ts.make_batches(pair[0].config.vocab_size, args.batch or DEFAULT_SHAPE[0], args.seq or DEFAULT_SHAPE[1],
                              args.seed)
    for n in args.contenders:
        c = build(n, pair, batches[0], args.amp)
        for _ in range(3):
            c.step(batches, "warmup")
        prof = ps.profile_contender(c, batches, args.profile)
        step = median([s["total"] for s in c.steps if s["tag"] == "profile"])
        t = Table(title=f"{ts.LABELS[n]}: top ops by self CPU time ({name} {args.amp}; profiled step {step:.3f} s)")
        for col in ("op", "group", "calls/step", "self ms/step"):
            t.add_column(col, justify="left" if col in ("op", "group") else "right")
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:args.top]:
            t.add_row(e.key[:70], ps.group_of(e.key), f"{e.count / args.profile:.0f}",
                      f"{e.self_cpu_time_total / 1e3 / args.profile:.1f}")
        console.print(t)
        del c


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["qwen3-moe-tiny", "mixtral-tiny"],
                   help="default: qwen3-moe-tiny mixtral-tiny (deepseek-v3-tiny is skipped until graphllm has it)")
    p.add_argument("--amp", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS),
                   help="graphllm, hf-eager and hf-compile are always run (the ratios need them)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps-per-round", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--probe-reps", type=int, default=2)
    p.add_argument("--batch", type=int, default=None, help=f"default {DEFAULT_SHAPE[0]}")
    p.add_argument("--seq", type=int, default=None, help=f"default {DEFAULT_SHAPE[1]}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-rss", action="store_true", help="skip the per-contender peak-RSS subprocesses")
    p.add_argument("--rss-steps", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="instead of timing: profile STEPS steps of each contender (profile_step.py's op table)")
    p.add_argument("--top", type=int, default=20, help="rows of the --profile table per contender")
    p.add_argument("--rss-child", choices=CONTENDERS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.contenders = sorted(set(args.contenders) | {"graphllm", "hf-eager", "hf-compile"}, key=CONTENDERS.index)
    if min(args.rounds, args.steps_per_round, args.probe_reps, args.rss_steps) < 1 or args.warmup < 0:
        p.error("--rounds, --steps-per-round, --probe-reps and --rss-steps must be ≥ 1, --warmup ≥ 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.rss_child:
        rss_child(args)
        return
    console = Console(width=None if sys.stdout.isatty() else 150)
    console.print(f"$ python {' '.join(sys.argv)}\nhost: {ts.host_kind()}; torch {torch.__version__}, transformers "
                  f"{transformers.__version__}; load average {os.getloadavg()[0]:.2f} at start")
    results, skipped = [], []
    for name in args.models:
        try:
            if args.profile:
                profile_model(name, args, console)
                continue
            res = bench_model(name, args.amp, args, console)
        except Skip as e:
            console.print(f"[yellow]skipped[/] {e}")
            skipped.append(str(e))
            continue
        results.append(res)
        ts.print_config(res, console)
        print_quiet_estimate(res, console)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"argv": sys.argv, "results": results, "skipped": skipped}, indent=1))


if __name__ == "__main__":
    main()
