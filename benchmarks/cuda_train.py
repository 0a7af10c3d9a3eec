"""bf16 training step of a ~1B Llama on one GPU: graphllm vs torch.compile(HF) vs HF eager.

    python benchmarks/cuda_train.py                      # one GPU, ~1B Llama, bf16 autocast
    python benchmarks/cuda_train.py --smoke              # tiny config, 1 round, on the CPU (checks the code paths)

The three contenders of train_step.py (same weights, data, fused AdamW and bf16 autocast with fp32 master
weights), built from the Llama config below, each with its own copy of the weights on the device; a first
(compiling) step each, warm-up, then `--rounds` interleaved rounds (common.run_rounds). Printed per contender:
median step time, tokens/s, the ratio to the others, MFU against the device's published dense bf16 peak
(PEAK_TFLOPS; `--peak-tflops` for another device), and CUDA memory: the step's peak above what was allocated
before it (activations, gradients, temporaries) and this contender's resident state (weights, gradients, AdamW
moments). FLOPs per step are train_step.py's count (graphllm's model-graph matmul and attention FLOPs × 3).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step as ts  # noqa: E402  (sets the inductor cache dir before torch is imported)
from common import fmt_mib, median, round_ratios, run_rounds  # noqa: E402

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from graphllm.models import ModelConfig, build_model  # noqa: E402
from graphllm.planning.flops import forward_flops  # noqa: E402

LLAMA_1B = {  # HF config.json fields (TinyLlama-like width, 16 layers): 0.85B parameters, untied embeddings
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 2048,
    "intermediate_size": 5632, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
    "tie_word_embeddings": False, "hidden_act": "silu",
}
SMOKE = {**LLAMA_1B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
PEAK_TFLOPS = {"H100 SXM": 989.0, "H100 HBM3": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0,
               "A100": 312.0}
"""Published dense bf16 tensor-core peaks (NVIDIA data sheets), matched in this order against the device name;
a bare "H100" is the SXM part (`torch.cuda.get_device_name` says "NVIDIA H100 80GB HBM3")."""


def peak_flops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """The device's dense bf16 peak in FLOP/s and its name (None on a CPU or an unknown GPU)."""
    if override is not None:
        return override * 1e12, "--peak-tflops"
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if all(word in name for word in key.split()):
            return tflops * 1e12, name
    return None, name


def state_bytes(c: ts.Contender) -> int:
    """Weights, gradients and AdamW moments of one contender (fp32: 16 bytes per parameter)."""
    params = [p for p in c.module.parameters() if p.requires_grad]
    moments = sum(t.numel() * t.element_size() for st in c.opt.state.values() for t in st.values()
                  if isinstance(t, torch.Tensor))
    return sum(2 * p.numel() * p.element_size() for p in params) + moments


def with_memory_probe(c: ts.Contender, device: torch.device) -> None:
    """Wrap `c.step` to record, per step, the CUDA peak above what was allocated before the step."""
    if device.type != "cuda":
        return
    step = c.step

    def probed(batches, tag):
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        rec = step(batches, tag)
        rec["peak_above_bytes"] = torch.cuda.max_memory_allocated(device) - before
        return rec
    c.step = probed


def build_all(args: argparse.Namespace, device: torch.device):
    cfg = ModelConfig.from_hf(SMOKE if args.smoke else LLAMA_1B, source="benchmarks/cuda_train.py")
    source = build_model(cfg, seed=args.seed)  # on the CPU; each contender copies it to the device
    source.source = "llama-1b" if not args.smoke else "llama-smoke"
    cpu_batches = ts.make_batches(cfg.vocab_size, args.batch, args.seq, args.seed)
    batches = [(x.to(device), y.to(device)) for x, y in cpu_batches]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    contenders = {}
    for name in ts.CONTENDERS:
        c = ts.build(name, source, batches[0], "bf16")
        c.sync = sync
        with_memory_probe(c, device)
        contenders[name] = c
    flops = 3 * forward_flops(contenders["graphllm"].compiled.result.model_graph)
    return source, batches, contenders, flops


def report(args, device, source, contenders, steady, flops, console: Console) -> None:
    peak, dev_name = peak_flops(device, args.peak_tflops)
    tokens = args.batch * args.seq
    med = {n: median([s["total"] for s in st]) for n, st in steady.items()}
    console.print(f"device {dev_name} · torch {torch.__version__} · {source.num_params() / 1e6:,.1f}M params · "
                  f"batch {args.batch} × seq {args.seq} = {tokens} tokens/step · {flops / 1e12:.2f} TFLOP/step · "
                  f"bf16 autocast, fp32 master weights · {args.rounds} rounds × {args.steps_per_round} steps")
    t = Table(title="train step (zero_grad + fwd + loss + bwd + fused AdamW), medians")
    cols = ["contender", "median step", "tokens/s", "× HF eager (rounds)", "× torch.compile(HF) (rounds)",
            "MFU", "step peak above resting", "resident state", "compile"]
    for col in cols:
        t.add_column(col, justify="left" if col == "contender" else "right")
    for n, c in contenders.items():
        def ratio(base: str, n: str = n) -> str:
            rs = round_ratios(steady, base, n, args.rounds)
            return f"{med[base] / med[n]:.2f}× ({min(rs):.2f}–{max(rs):.2f})"
        mfu = f"{100 * flops / med[n] / peak:.1f}%" if peak else "n/a"
        mem = [s["peak_above_bytes"] for s in steady[n] if "peak_above_bytes" in s]
        compile_s = c.prepare_s + c.steps[0]["total"] - med[n]
        t.add_row(ts.LABELS[n], f"{1e3 * med[n]:.1f} ms", f"{tokens / med[n]:,.0f}", ratio("hf-eager"),
                  ratio("hf-compile"), mfu, fmt_mib(max(mem)) if mem else "n/a", fmt_mib(state_bytes(c)),
                  f"{compile_s:.1f} s")
    console.print(t)
    total = f"{fmt_mib(torch.cuda.max_memory_allocated(device))}" if device.type == "cuda" else "n/a (cpu)"
    peak_text = (f"{peak / 1e12:.0f} TFLOP/s dense bf16" if peak else "none published for a CPU"
                 if device.type == "cpu" else "unknown device, pass --peak-tflops")
    losses = ", ".join(f"{ts.LABELS[n]} {c.steps[0]['loss']:.4f}" for n, c in contenders.items())
    console.print(f"first-step losses (same weights and data): {losses}; CUDA max_memory_allocated of the "
                  f"process (all three contenders resident): {total}; MFU peak: "
                  f"{peak_text}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny config, 1 round, on the CPU: exercise the code paths")
    p.add_argument("--batch", type=int, default=None, help="default 4 (smoke 1)")
    p.add_argument("--seq", type=int, default=None, help="default 2048 (smoke 32)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; smoke 1)")
    p.add_argument("--steps-per-round", type=int, default=None, help="default 5 (smoke 1)")
    p.add_argument("--warmup", type=int, default=None, help="steps after the compiling one (default 3; smoke 0)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak, for a device not in the table")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    small = args.smoke
    for flag, full, smoke in (("batch", 4, 1), ("seq", 2048, 32), ("rounds", 5, 1), ("steps_per_round", 5, 1),
                              ("warmup", 3, 0)):
        if getattr(args, flag) is None:
            setattr(args, flag, smoke if small else full)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 160)
    if args.smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        console.print("cuda_train: no CUDA device (torch.cuda.is_available() is False); use --smoke on a CPU")
        return 2
    console.print("$ python " + " ".join(sys.argv))
    source, batches, contenders, flops = build_all(args, device)
    steady = run_rounds(contenders, batches, args)
    report(args, device, source, contenders, steady, flops, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
