"""Decode tokens/s: graphllm's static prefill/decode graphs vs transformers `generate`, same model, same run.

    python benchmarks/generate.py                                   # tiny-llama, batch 1 and 4
    python benchmarks/generate.py --models tiny-llama ~/models/smollm2-135m-instruct --batch 1

Both sides get the same weights (a preset is saved as an HF directory first) and the same random
prompts of `--prompt-len` tokens, decode greedily with EOS disabled, and must produce identical ids
(checked every round). A generation of `--new-tokens` tokens and one of a single token are timed; the
decode rate is B·(N − 1) / (t_N − t_1), the same formula for both, so prefill and per-call overhead
cancel. Contenders and the two lengths run interleaved round-robin in one process, the order rotated
each round; figures are medians over `--rounds`, and the ratio is the ratio of medians with the
per-round range. graphllm's compile time (prefill + decode graphs, one warm-up call each) is reported
apart. transformers runs its default path (sdpa attention, DynamicCache) in eager PyTorch.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_inductor_cache, interleave, median


def hf_dir_for(name: str, tmp: Path) -> Path:
    """An HF directory for a preset (random weights, saved) or the directory itself."""
    from graphllm.models import load_model
    from graphllm.models.registry import PRESETS
    from graphllm.models.weights import save_hf

    if name not in PRESETS:
        return Path(name)
    model = load_model(name, seed=0)
    return save_hf(model, model.config, tmp / name)


def bench_model(name: str, batches: list[int], args: argparse.Namespace, tmp: Path) -> list[dict]:
    from graphllm.models import load_model
    from transformers import AutoModelForCausalLM

    from graphllm.generate import StaticGenerator, bucket

    path = hf_dir_for(name, tmp)
    ours_model = load_model(path)
    hf = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="sdpa", dtype=torch.float32).eval()
    hf.generation_config.pad_token_id = 0
    vocab = ours_model.config.vocab_size
    rows = []
    for B in batches:
        prompts = torch.randint(0, vocab, (B, args.prompt_len), generator=torch.Generator().manual_seed(B))
        max_len = bucket(args.prompt_len, min_bucket=16, max_len=10**9) + args.new_tokens
        t0 = time.perf_counter()
        gen = StaticGenerator(ours_model, batch_size=B, max_len=max_len, backend=args.backend)
        gen.prefill_graph(bucket(args.prompt_len, min_bucket=16, max_len=max_len))
        gen.decode_graph()
        compile_s = time.perf_counter() - t0

        def ours(n: int, B=B, gen=gen, prompts=prompts) -> list[list[int]]:
            out: list[list[int]] = [[] for _ in range(B)]
            for step in gen.run(prompts.tolist(), max_new_tokens=n):
                for b, tok in enumerate(step):
                    if tok is not None:
                        out[b].append(tok)
            return out

        def theirs(n: int, prompts=prompts) -> list[list[int]]:
            with torch.no_grad():
                ids = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, eos_token_id=None)
            return ids[:, args.prompt_len:].tolist()

        fns = {"graphllm": ours, "transformers": theirs}
        ids = {k: f(args.new_tokens) for k, f in fns.items()}  # warm-up, and the parity check
        for k, f in fns.items():
            f(1)
        same = ids["graphllm"] == ids["transformers"]
        times: dict[str, dict[int, list[float]]] = {k: {1: [], args.new_tokens: []} for k in fns}
        contenders = [f"{k}:{n}" for k in fns for n in (1, args.new_tokens)]
        for order in interleave(contenders, args.rounds):
            for c in order:
                k, n = c.split(":")
                t0 = time.perf_counter()
                got = fns[k](int(n))
                times[k][int(n)].append(time.perf_counter() - t0)
                if int(n) == args.new_tokens:
                    same &= got == ids["graphllm"]
        rates = {}
        for k in fns:
            per_round = [B * (args.new_tokens - 1) / (tn - t1)
                         for tn, t1 in zip(times[k][args.new_tokens], times[k][1])]
            rates[k] = (B * (args.new_tokens - 1) / (median(times[k][args.new_tokens]) - median(times[k][1])),
                        per_round)
        ratios = [a / b for a, b in zip(rates["graphllm"][1], rates["transformers"][1])]
        row = {"model": name, "batch": B, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
               "backend": args.backend, "graphllm_decode_tok_s": rates["graphllm"][0],
               "transformers_decode_tok_s": rates["transformers"][0],
               "ratio": rates["graphllm"][0] / rates["transformers"][0], "ratio_range": [min(ratios), max(ratios)],
               "graphllm_compile_s": compile_s, "compile_counts": gen.compile_counts, "greedy_ids_identical": same,
               "rounds": args.rounds, "threads": torch.get_num_threads()}
        print(f"{name:>24} B={B}: graphllm {row['graphllm_decode_tok_s']:8.1f} tok/s | transformers "
              f"{row['transformers_decode_tok_s']:8.1f} tok/s | ratio {row['ratio']:.2f}× "
              f"(rounds {min(ratios):.2f}–{max(ratios):.2f}) | compile {compile_s:.1f} s | ids identical: {same}",
              flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny-llama"], help="presets and/or HF directories")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for both sides (default: torch's). On a CPU shared with other "
                        "jobs use 1: OpenMP threads spinning at barriers while descheduled slow both sides ~10×")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cache, warm = ensure_inductor_cache()
    print(f"inductor cache {cache} ({'warm' if warm else 'cold'}); torch threads {torch.get_num_threads()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += bench_model(name, args.batch, args, Path(tmp))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
