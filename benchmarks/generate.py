"""Decode tokens/s: graphllm's static prefill/decode graphs vs transformers `generate`, same model, same run.

    python benchmarks/generate.py                                   # tiny-llama, batch 1 and 4
    python benchmarks/generate.py --models tiny-llama ~/models/smollm2-135m-instruct --batch 1
    python benchmarks/generate.py --models ~/models/smollm2 --batch 1 --dtypes fp32 bf16 --threads 1

Both sides get the same weights (a preset is saved as an HF directory first) and the same random
prompts of `--prompt-len` tokens, decode greedily with EOS disabled, and ids are compared every round
(fp32: must be identical; bf16: reported, as kernels that fuse bf16 ops may round differently). A
generation of `--new-tokens` tokens and one of a single token are timed; the decode rate is
B·(N − 1) / (t_N − t_1), the same formula for both, so prefill and per-call overhead cancel. Each
`--dtypes` entry is a pair of contenders: graphllm with its weights and KV cache stored in that dtype
(`StaticGenerator(dtype=...)`) and transformers loaded in it (`from_pretrained(dtype=...)`).
Contenders, the two lengths and a STREAM-style copy probe (`dst.copy_(src)` of `--copy-mib` MiB,
bandwidth = 2·bytes / time: read + write, as STREAM counts) run interleaved round-robin in one process,
the order rotated each round; figures are medians over `--rounds`, ratios are ratios of medians with
the per-round range. The memory-bandwidth bound of a decode step is B · copy bandwidth / weight bytes
read per step (every weight once; an untied embedding only one row per token). graphllm's compile time
(prefill + decode graphs, one warm-up call each) is reported apart. transformers runs its default path
(sdpa attention, DynamicCache) in eager PyTorch. `--profile N` adds torch.profiler's top ops over N
decode steps of each graphllm dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_inductor_cache, interleave, median

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def host_line() -> str:
    """CPU model, cores, the bf16 matmul flags the CPU has, load average."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    bf16 = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags] or ["none"]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"host: {model}, {os.cpu_count()} cpus, bf16 flags: {' '.join(bf16)}; load average {load}"


class CopyProbe:
    """STREAM-style copy bandwidth: `dst.copy_(src)` of a tensor far larger than the caches."""

    def __init__(self, mib: int) -> None:
        n = mib * 2**20 // 4
        self.src, self.dst = torch.ones(n), torch.empty(n)  # float32
        self.dst.copy_(self.src)  # fault the pages in, untimed
        self.times: list[float] = []

    def run(self, reps: int = 5) -> None:
        for _ in range(reps):
            t0 = time.perf_counter()
            self.dst.copy_(self.src)
            self.times.append(time.perf_counter() - t0)

    @property
    def bytes_per_s(self) -> float:
        return 2 * self.src.numel() * 4 / median(self.times)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: each distinct parameter once, except an embedding that is
    not also the LM head, of which a step reads one row per token."""
    emb = model.model.embed_tokens.weight
    tied = model.lm_head.weight is emb
    total = sum(p.numel() * p.element_size() for p in model.parameters() if p is not emb)
    return total + (emb.numel() if tied else emb.shape[1]) * emb.element_size()


def hf_dir_for(name: str, tmp: Path) -> Path:
    """An HF directory for a preset (random weights, saved) or the directory itself."""
    from graphllm.models import load_model
    from graphllm.models.registry import PRESETS
    from graphllm.models.weights import save_hf

    if name not in PRESETS:
        return Path(name)
    model = load_model(name, seed=0)
    return save_hf(model, model.config, tmp / name)


def contenders(path: Path, B: int, prompts: torch.Tensor, args: argparse.Namespace) -> tuple[dict, dict, dict]:
    """Per dtype, graphllm's and transformers' `f(n) -> ids [B][n]`; graphllm's generators; compile seconds."""
    from graphllm.models import load_model
    from transformers import AutoModelForCausalLM

    from graphllm.generate import StaticGenerator, bucket

    fns, gens, compile_s = {}, {}, {}
    max_len = bucket(args.prompt_len, min_bucket=16, max_len=10**9) + args.new_tokens
    variants = [("", None), ("-blas", False)] if args.blas else [("", None)]
    for dt in args.dtypes:
        for suffix, gemv in variants:
            t0 = time.perf_counter()
            gen = StaticGenerator(load_model(path), batch_size=B, max_len=max_len, backend=args.backend, dtype=dt,
                                  gemv=gemv)
            gen.prefill_graph(bucket(args.prompt_len, min_bucket=16, max_len=max_len))
            gen.decode_graph()
            name = f"graphllm-{dt}{suffix}"
            compile_s[name], gens[name], fns[name] = time.perf_counter() - t0, gen, _ours(gen, prompts)
        hf = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="sdpa", dtype=DTYPES[dt]).eval()
        hf.generation_config.pad_token_id = 0

        def theirs(n: int, hf=hf) -> list[list[int]]:
            with torch.no_grad():
                ids = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, eos_token_id=None)
            return ids[:, args.prompt_len:].tolist()

        fns[f"transformers-{dt}"] = theirs
    return fns, gens, compile_s


def _ours(gen, prompts: torch.Tensor):
    def ours(n: int) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in range(prompts.shape[0])]
        for step in gen.run(prompts.tolist(), max_new_tokens=n):
            for b, tok in enumerate(step):
                if tok is not None:
                    out[b].append(tok)
        return out

    return ours


def time_rounds(fns: dict, probe: CopyProbe, args: argparse.Namespace) -> tuple[dict, dict]:
    """Interleaved rounds: seconds per (contender, length), and per dtype whether the ids stayed equal."""
    N = args.new_tokens
    ids = {k: f(N) for k, f in fns.items()}  # warm-up, and the parity check
    for f in fns.values():
        f(1)
    same = {k: ids[k] == ids[f"transformers-{k.split('-')[1]}"] for k in fns if k.startswith("graphllm")}
    times: dict[str, dict[int, list[float]]] = {k: {1: [], N: []} for k in fns}
    for order in interleave([f"{k}:{n}" for k in fns for n in (1, N)] + ["copy"], args.rounds):
        for c in order:
            if c == "copy":
                probe.run()
                continue
            k, n = c.split(":")
            t0 = time.perf_counter()
            got = fns[k](int(n))
            times[k][int(n)].append(time.perf_counter() - t0)
            if int(n) == N and k in same:
                same[k] &= got == ids[k]
    return times, same


def summarize(name: str, B: int, times: dict, same: dict, probe: CopyProbe, gens: dict, compile_s: dict,
              args: argparse.Namespace) -> dict:
    """Decode rates (medians), ratios with per-round ranges, fraction of the bandwidth bound; printed."""
    N = args.new_tokens
    per_round = {k: [B * (N - 1) / (tn - t1) for tn, t1 in zip(t[N], t[1])] for k, t in times.items()}
    rate = {k: B * (N - 1) / (median(t[N]) - median(t[1])) for k, t in times.items()}
    bw = probe.bytes_per_s
    row = {"model": name, "batch": B, "prompt_len": args.prompt_len, "new_tokens": N, "backend": args.backend,
           "rounds": args.rounds, "threads": torch.get_num_threads(), "copy_GB_s": bw / 1e9, "contenders": {}}
    print(f"{name} B={B}, threads {row['threads']}: copy bandwidth {bw / 1e9:.1f} GB/s (median)", flush=True)
    for g in gens:  # graphllm-<dtype>[-blas], each against transformers in the same dtype
        dt = g.split("-")[1]
        t = f"transformers-{dt}"
        ratios = [a / b for a, b in zip(per_round[g], per_round[t])]
        wbytes = weight_bytes(gens[g].model)
        bound = B * bw / wbytes
        row["contenders"][g] = d = {
            "graphllm_decode_tok_s": rate[g], "transformers_decode_tok_s": rate[t], "ratio": rate[g] / rate[t],
            "ratio_range": [min(ratios), max(ratios)], "weight_MB": wbytes / 1e6, "bound_tok_s": bound,
            "graphllm_of_bound": rate[g] / bound, "transformers_of_bound": rate[t] / bound,
            "greedy_ids_identical": same[g], "graphllm_compile_s": compile_s[g],
            "compile_counts": gens[g].compile_counts}
        print(f"  {g}: {rate[g]:7.2f} tok/s | transformers-{dt} {rate[t]:7.2f} tok/s | ratio {d['ratio']:.2f}× "
              f"(rounds {min(ratios):.2f}–{max(ratios):.2f}) | bound {bound:.1f} tok/s ({wbytes / 1e6:.0f} MB/step): "
              f"graphllm {d['graphllm_of_bound']:.0%}, transformers {d['transformers_of_bound']:.0%} | "
              f"compile {compile_s[g]:.1f} s | ids identical: {same[g]}", flush=True)
    if {"fp32", "bf16"} <= set(args.dtypes):
        for side in ("graphllm", "transformers"):
            r = [a / b for a, b in zip(per_round[f"{side}-bf16"], per_round[f"{side}-fp32"])]
            row[f"{side}_bf16_over_fp32"] = x = rate[f"{side}-bf16"] / rate[f"{side}-fp32"]
            print(f"  {side} bf16 / fp32 decode: {x:.2f}× (rounds {min(r):.2f}–{max(r):.2f})", flush=True)
    return row


def profile_decode(gen, prompts: torch.Tensor, steps: int, label: str) -> None:
    """torch.profiler over `steps` decode steps (after the prefill): the top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    it = gen.run(prompts.tolist(), max_new_tokens=steps + 1)
    next(it)  # the prefill's token
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in it:
            pass
    print(f"--- profile: {label}, {steps} decode steps, top ops by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))


def bench_model(name: str, batches: list[int], args: argparse.Namespace, tmp: Path) -> list[dict]:
    path = hf_dir_for(name, tmp)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    probe = CopyProbe(args.copy_mib)
    rows = []
    for B in batches:
        prompts = torch.randint(0, vocab, (B, args.prompt_len), generator=torch.Generator().manual_seed(B))
        fns, gens, compile_s = contenders(path, B, prompts, args)
        times, same = time_rounds(fns, probe, args)
        rows.append(summarize(name, B, times, same, probe, gens, compile_s, args))
        if args.profile:
            for g, gen in gens.items():
                profile_decode(gen, prompts, args.profile, f"{name} B={B} {g}")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny-llama"], help="presets and/or HF directories")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--dtypes", nargs="+", default=["fp32"], choices=tuple(DTYPES),
                   help="weight/cache dtypes to run, each for graphllm and transformers (default fp32)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--blas", action="store_true",
                   help="also time graphllm with its decode linears left to BLAS (StaticGenerator(gemv=False))")
    p.add_argument("--copy-mib", type=int, default=512, help="size of the copy bandwidth probe's tensors")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the rounds, profile N decode steps of each graphllm dtype (0: off)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for both sides (default: torch's). On a CPU shared with other "
                        "jobs use 1: OpenMP threads spinning at barriers while descheduled slow both sides ~10×")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cache, warm = ensure_inductor_cache()
    print(f"$ python {' '.join(sys.argv)}")
    print(host_line())
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
