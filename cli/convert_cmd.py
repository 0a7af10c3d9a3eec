"""`graphllm convert`: HF model directory <-> graphllm checkpoint (graphllm/convert.py does the work), LoRA
adapters <-> PEFT adapter directories / merged HF models (graphllm/lora_io.py), and Megatron-LM checkpoints <->
graphllm checkpoints (cli/convert_megatron_cmd.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from graphllm.cli.convert_megatron_cmd import add_megatron_parsers, report_conversion

DTYPE_CHOICES = ("fp32", "bf16", "fp16")


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert weights between Hugging Face directories and graphllm checkpoints")
    kinds = p.add_subparsers(dest="direction", required=True)
    to_ckpt = kinds.add_parser("hf-to-graphllm", help="HF directory -> OUT/step_0 (weights-only checkpoint)")
    to_ckpt.add_argument("--hf", type=Path, required=True, metavar="HF_DIR", help="config.json + *.safetensors")
    to_ckpt.add_argument("--out", type=Path, required=True, metavar="ROOT",
                         help="checkpoint root; `graphllm run ARTIFACT --load ROOT` starts from these weights")
    to_ckpt.add_argument("--tp", type=int, default=1, help="check the model splits over this many tensor ranks")
    to_ckpt.add_argument("--pp", type=int, default=1, help="check the model splits over this many pipeline stages")
    to_ckpt.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="cast (default: keep stored dtypes)")
    to_ckpt.add_argument("--force", action="store_true", help="write into a non-empty ROOT (replaces ROOT/step_0)")
    to_ckpt.add_argument("--mtp-layers", type=int, default=0, metavar="N",
                         help="keep the first N multi-token prediction modules (DeepSeek-V3; default: drop them)")
    to_ckpt.set_defaults(func=run_hf_to_graphllm)

    to_hf = kinds.add_parser("graphllm-to-hf", help="graphllm checkpoint -> HF directory transformers loads")
    to_hf.add_argument("--ckpt", type=Path, required=True, metavar="CKPT",
                       help="a step_<N> directory, or a root (its newest complete step)")
    to_hf.add_argument("--out", type=Path, required=True, metavar="HF_DIR",
                       help="directory to write (must not exist or be empty, unless --force)")
    to_hf.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="cast (default: keep stored dtypes)")
    to_hf.add_argument("--max-shard-size", default="5GB",
                       help="split model.safetensors into shards + index above this size (default 5GB)")
    to_hf.add_argument("--tokenizer", type=Path, default=None, metavar="DIR",
                       help="copy tokenizer files from DIR (default: those the checkpoint carries)")
    to_hf.add_argument("--force", action="store_true",
                       help="write into a non-empty HF_DIR (replaces its config and weight files, keeps others)")
    to_hf.set_defaults(func=run_graphllm_to_hf)
    add_lora_parsers(kinds)
    add_megatron_parsers(kinds)


def run_hf_to_graphllm(args: argparse.Namespace) -> int:
    from graphllm.convert import hf_to_graphllm

    result = hf_to_graphllm(args.hf, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype, force=args.force,
                            mtp_layers=args.mtp_layers)
    report_conversion(result, f"weights only; `graphllm run ARTIFACT --load {args.out}` starts at step 0 with a fresh "
                    "optimizer (any --tp/--pp/--dp layout loads it)")
    return 0


def run_graphllm_to_hf(args: argparse.Namespace) -> int:
    from graphllm.convert import graphllm_to_hf

    result = graphllm_to_hf(args.ckpt, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                            tokenizer=args.tokenizer, force=args.force)
    report_conversion(result, f"with {', '.join(result.files)}; transformers' from_pretrained loads it")
    return 0


# -- LoRA adapters (graphllm/lora_io.py) ---------------------------------------------------------------------
def add_lora_parsers(kinds) -> None:
    to_peft = kinds.add_parser("lora-to-peft", help="graphllm LoRA checkpoint -> PEFT adapter directory")
    to_peft.add_argument("--ckpt", type=Path, required=True, metavar="CKPT",
                         help="a step_<N> directory of a LoRA run, or its root (the newest complete step)")
    to_peft.add_argument("--out", type=Path, required=True, metavar="DIR",
                         help="adapter directory to write (adapter_config.json + adapter_model.safetensors)")
    _lora_overrides(to_peft)
    to_peft.add_argument("--force", action="store_true", help="write into a non-empty DIR (replaces the adapter files)")
    to_peft.set_defaults(func=run_lora_to_peft)

    merge = kinds.add_parser("merge-lora", help="base HF model + LoRA adapters -> merged HF directory")
    merge.add_argument("--ckpt", type=Path, required=True, metavar="CKPT",
                       help="a LoRA checkpoint (step_<N> or root), or a PEFT adapter directory")
    merge.add_argument("--hf", type=Path, required=True, metavar="BASE_DIR", help="the base model the adapters train")
    merge.add_argument("--out", type=Path, required=True, metavar="HF_DIR", help="merged model directory to write")
    merge.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="cast (default: the base's dtypes)")
    merge.add_argument("--max-shard-size", default="5GB", help="split the weights above this size (default 5GB)")
    _lora_overrides(merge)
    merge.add_argument("--force", action="store_true", help="write into a non-empty HF_DIR (replaces model files)")
    merge.set_defaults(func=run_merge_lora)

    from_peft = kinds.add_parser("peft-to-graphllm", help="PEFT adapter + base HF model -> OUT/step_0 (weights only)")
    from_peft.add_argument("--adapter", type=Path, required=True, metavar="DIR", help="a PEFT LoRA adapter directory")
    from_peft.add_argument("--hf", type=Path, required=True, metavar="BASE_DIR", help="the adapter's base model")
    from_peft.add_argument("--out", type=Path, required=True, metavar="ROOT",
                           help="checkpoint root; `graphllm run ARTIFACT --load ROOT` continues from the adapter")
    from_peft.set_defaults(func=run_peft_to_graphllm)


def _lora_overrides(p) -> None:
    p.add_argument("--lora-alpha", type=float, default=None, metavar="X",
                   help="the run's --lora-alpha, for a checkpoint that does not record its LoRA settings")
    p.add_argument("--lora-rslora", action="store_true", default=None, help="the run used --lora-rslora (same case)")


def run_lora_to_peft(args: argparse.Namespace) -> int:
    from graphllm.lora_io import lora_to_peft

    out, ad = lora_to_peft(args.ckpt, args.out, alpha=args.lora_alpha, rslora=args.lora_rslora, force=args.force)
    print(f"wrote {out}: {len(ad.factors)} adapted layers, rank {ad.rank}, alpha {ad.alpha:g} (scale {ad.scale:g}); "
          "peft.PeftModel.from_pretrained(base_model, DIR) loads it")
    return 0


def run_merge_lora(args: argparse.Namespace) -> int:
    from graphllm.lora_io import merge_lora

    result, ad = merge_lora(args.ckpt, args.hf, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                            force=args.force, alpha=args.lora_alpha, rslora=args.lora_rslora)
    report_conversion(result, f"{len(ad.factors)} layers merged (W + s·BA, s = {ad.scale:g}); transformers' from_pretrained "
                    "loads it")
    return 0


def run_peft_to_graphllm(args: argparse.Namespace) -> int:
    from graphllm.lora_io import compile_flags, peft_to_graphllm

    step, settings = peft_to_graphllm(args.adapter, args.hf, args.out)
    print(f"wrote {step}: base {args.hf} + a rank-{settings['rank']} adapter on {len(settings['target'])} target "
          f"name(s), weights only; compile with `graphllm compile --model {args.hf} {compile_flags(settings)} ...`, "
          f"then `graphllm run ARTIFACT --load {args.out}`")
    return 0
