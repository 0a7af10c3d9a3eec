"""Expert parallelism on a small Mixtral: peak memory and step time per rank, --ep 1 vs --ep 2, both dispatchers.

    python benchmarks/moe_ep.py [--steps 5 --warmup 2 --threads 1 --experts 8 --hidden 256 --layers 4]

Every row is 2 gloo ranks (dp rows: each rank its own rows; tp rows: one micro-batch shared), compiled with inductor and
measured by benchmarks/plan_measure.py in each rank (torchrun; its docstring defines "allocator peak": live tensor
bytes at a step's start plus the CPU allocator's in-step peak, the CPU counterpart of max_memory_allocated):

    dp2          every rank holds all E experts (and their gradients and AdamW states)
    dp2-ep2      each rank holds E/2 experts; the all-gather dispatcher (dropless)
    dp2-ep2-a2a  the same shards; the all-to-all dispatcher (dropless: worst-case padded buffers)
    dp2-ep2-a2a-cf1.25  all-to-all with --moe-capacity-factor 1.25 (buffers bounded by the capacity)
    tp2          tensor parallel (one micro-batch for both ranks): attention split, every expert whole on both
    tp2-etp2     the same with expert tensor parallelism (--etp 2): each expert's MLP split over the two ranks

The model is a random-initialised Mixtral written to a temporary directory (transformers' MixtralConfig: the
sizes below are chosen so the experts are most of the parameters, as in real MoE models: 8 experts of
intermediate 1024 at hidden 256 are 6.3 M of the 8.5 M parameters per layer).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_inductor_cache, fmt_mib, median  # noqa: E402
from plan_validation import Row, run_row  # noqa: E402

VOCAB = 32000
ROWS = {  # name: (layout, moe options)
    "dp2": ({"dp": 2}, {}),
    "dp2-ep2": ({"dp": 2, "ep": 2}, {}),
    "dp2-ep2-a2a": ({"dp": 2, "ep": 2}, {"dispatcher": "alltoall"}),
    "dp2-ep2-a2a-cf1.25": ({"dp": 2, "ep": 2}, {"dispatcher": "alltoall", "capacity_factor": 1.25}),
    "tp2": ({"tp": 2}, {}),
    "tp2-etp2": ({"tp": 2, "etp": 2}, {}),
}


def write_model(root: Path, args: argparse.Namespace) -> str:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                        num_local_experts=args.experts, num_experts_per_tok=2, max_position_embeddings=1024,
                        output_router_logits=True, router_aux_loss_coef=0.01)
    torch.manual_seed(0)
    MixtralForCausalLM(cfg).save_pretrained(root / "mixtral")
    return str(root / "mixtral")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rows", default=",".join(ROWS))
    args = ap.parse_args()
    ensure_inductor_cache()
    with tempfile.TemporaryDirectory(prefix="moe_ep_") as tmp:
        model = write_model(Path(tmp), args)
        print(f"Mixtral {args.layers}×{args.hidden}, {args.experts} experts top-2, micro-batch {args.batch_size}×"
              f"{args.seq_len} per rank, 2 ranks × {args.threads} thread(s), inductor, median of {args.steps} steps\n")
        print("| row | parameters / rank | optimizer states / rank | allocator peak / rank | median step (s) | "
              "tokens/s (2 ranks) | loss |")
        print("|---|---|---|---|---|---|---|")
        for name in args.rows.split(","):
            layout, moe = ROWS[name]
            ranks = run_row(Row(name, model=model, batch_size=args.batch_size, seq_len=args.seq_len, layout=layout,
                                moe=moe), args)
            mem = [r["memory"] for r in ranks]
            step = max(r["median_step_s"] for r in ranks)
            tokens = layout.get("dp", 1) * args.batch_size * args.seq_len
            print(f"| {name} | {fmt_mib(max(m['parameters'] for m in mem))} | "
                  f"{fmt_mib(max(m['optimizer_states'] for m in mem))} | "
                  f"{fmt_mib(max(m['allocator_peak'] for m in mem))} | {step:.3f} | {tokens / step:.0f} | "
                  f"{median([r['loss'] for r in ranks]):.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
