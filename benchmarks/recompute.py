"""Activation recomputation policies side by side: saved activation bytes and median step time.

One step = forward + loss + backward (no optimizer: recompute changes neither). Each policy compiles
its own copy of the same model (same seed, same batch); the policies run interleaved round-robin in
this one process after a compiling step and a warm-up step each, and the table reports the median
steady step. Saved bytes are what the forward hands the backward (parameters and inputs excluded),
read off the partitioned backward graph (graphllm.planning.memory.saved_activation_bytes).

    python benchmarks/recompute.py --model small-llama --seq-len 512 --batch-size 1 --backend inductor
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` when run as a script
from common import ensure_inductor_cache, fmt_mib, interleave, median  # noqa: E402

POLICIES = {
    "none": ("none", {}),
    "full": ("full", {"method": "uniform", "layers": 1}),
    "selective attn": ("selective", {"ops": ("attention",)}),
    "selective all": ("selective", {"ops": ("attention", "activation", "norm")}),
    "budget 0.5": ("budget", {"budget": 0.5}),
    "budget 0.1": ("budget", {"budget": 0.1}),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small-llama")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--backend", default="inductor", choices=["eager", "inductor"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated names from the table")
    args = ap.parse_args()
    if args.backend == "inductor":
        ensure_inductor_cache()
    import graphllm
    from graphllm.planning.memory import saved_activation_bytes
    from graphllm.planning.recompute_config import RecomputeConfig

    names = [n for n in args.policies.split(",") if n]
    g = torch.Generator().manual_seed(1)
    runs, saved, compile_s, losses = {}, {}, {}, {}
    for name in names:
        policy, opts = POLICIES[name]
        model = graphllm.load_model(args.model, seed=0)
        if name == names[0]:
            ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), generator=g)
            labels = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), generator=g)
        compiled = graphllm.compile(model, ids, labels, backend=args.backend,
                                    recompute=RecomputeConfig(policy=policy, **opts))

        def step(compiled=compiled, model=model) -> torch.Tensor:
            model.zero_grad(set_to_none=True)
            loss = compiled(ids, labels)
            loss.backward()
            return loss.detach()

        t0 = time.perf_counter()
        losses[name] = step()
        compile_s[name] = time.perf_counter() - t0
        step()  # warm-up
        graphs = compiled.result.train_stage.graphs
        saved[name] = saved_activation_bytes(graphs["backward"])
        runs[name] = step
        print(f"compiled {name}: first step {compile_s[name]:.1f} s", file=sys.stderr)
    times: dict[str, list[float]] = {n: [] for n in names}
    for order in interleave(names, args.rounds):
        for name in order:
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
    base_t, base_b = median(times[names[0]]), saved[names[0]]
    print(f"\n{args.model}, batch {args.batch_size}, seq {args.seq_len}, backend {args.backend}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds} interleaved steps")
    print(f"| policy | saved activations | vs {names[0]} | median step (fwd+bwd) | vs {names[0]} | loss equal |")
    print("|---|---:|---:|---:|---:|---|")
    for n in names:
        t = median(times[n])
        print(f"| {n} | {fmt_mib(saved[n])} | {saved[n] / base_b:.2f}x | {t * 1e3:.0f} ms | {t / base_t:.2f}x | "
              f"{torch.equal(losses[n], losses[names[0]])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
