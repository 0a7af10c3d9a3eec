"""`graphllm generate`: complete prompts on compiled static graphs, streaming the text as it is produced."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from graphllm.errors import GraphllmError


def _unescape(text: str) -> str:
    """`--stop "\\n\\n"` as typed in a shell means two newlines."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def add_model_args(p: argparse.ArgumentParser, *, max_new_tokens: int) -> None:
    """Flags shared by generate and chat: the model, graphs, sampling."""
    p.add_argument("--model", required=True, help="preset (random weights) or HF checkpoint dir")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer (.model file or HF dir); default: the checkpoint's own, builtin for presets")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens to generate at most")
    p.add_argument("--max-len", type=int, default=None,
                   help="KV cache length in tokens (prompt + new); default: just enough (generate), 2048 (chat)")
    p.add_argument("--backend", default="inductor", help="eager | inductor | npu (default inductor)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                   help="weights, activations and KV cache: bf16 stores the weights in bf16 (half the bytes read "
                        "per token; norms and softmax in fp32 inside, as transformers' bf16 models)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL penalty on seen tokens (1: off)")
    p.add_argument("--stop", action="append", default=[], type=_unescape,
                   help="stop string (repeatable; \\n and \\t are newline and tab); not printed")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, and init seed of preset models")
    p.add_argument("--lora", default=None, metavar="CKPT_OR_ADAPTER",
                   help="LoRA adapters to merge into --model before compiling: a graphllm LoRA checkpoint (step_<N> "
                        "or its root) or a PEFT adapter directory (docs/lora.md)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks: the command re-runs itself as N local processes (torchrun); "
                        "each holds 1/N of the heads, MLP and KV cache")


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text on static prefill/decode graphs (docs/inference.md)")
    add_model_args(p, max_new_tokens=128)
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat for a batch (each prompt its own row)")
    p.set_defaults(func=run)


def sampling_from(args: argparse.Namespace):
    from graphllm.generate import SamplingConfig

    return SamplingConfig(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed)


def load(args: argparse.Namespace):
    """The model, its tokenizer (an Encoder) and its EOS ids."""
    from graphllm.models import load_model

    from graphllm.data.encoders import load_encoder, resolve_spec
    from graphllm.generate import eos_ids_of

    if getattr(args, "lora", None):
        from graphllm.lora_io import merged_model

        net = merged_model(args.model, args.lora, seed=args.seed)  # merged: the graphs stay plain linears
    else:
        net = load_model(args.model, seed=args.seed)
    spec = args.tokenizer or (args.model if os.path.isdir(args.model) else "builtin")
    enc = load_encoder(resolve_spec(spec), name=spec)
    if enc.vocab_size > net.config.vocab_size:
        raise GraphllmError(f"tokenizer {spec} has {enc.vocab_size} tokens but {args.model} has vocab_size="
                            f"{net.config.vocab_size}; pass --tokenizer with the model's own tokenizer")
    return net, enc, eos_ids_of(net.source, enc)


def report(stats, err=None) -> None:
    err = err or sys.stderr  # looked up per call: a default bound at import would outlive a redirected stderr
    print(f"[prompt {stats.prompt_tokens} tokens, {stats.prompt_tokens_per_s:.1f} tok/s | "
          f"decode {stats.new_tokens} tokens, {stats.decode_tokens_per_s:.1f} tok/s | "
          f"compile {stats.compile_s:.1f} s]", file=err, flush=True)


def launch_tp(args: argparse.Namespace, *, batch_size: int) -> int | None:
    """Under --tp N outside a launched world: check the model splits, then re-run this command as N
    ranks and return their exit code. Otherwise None (one process, or already one of the ranks)."""
    if args.tp < 1:
        raise GraphllmError(f"--tp must be at least 1, got {args.tp}")
    if args.tp == 1:
        return None
    from graphllm.launch import in_launched_world, relaunch

    if in_launched_world():
        return None
    from graphllm.models import load_config

    from graphllm.planning import Layout

    Layout(tp=args.tp).check_model(load_config(args.model), batch_size=batch_size, seq_len=2)
    return relaunch(args.tp, args.argv)


@contextlib.contextmanager
def rank_zero_output():
    """Ranks other than 0 print nothing (they run the same loop, so they would repeat rank 0's text);
    the process group is closed at the end on every rank."""
    from graphllm.launch import in_launched_world, is_rank_zero

    if not in_launched_world():
        yield
        return
    from graphllm.parallel.groups import destroy

    try:
        if is_rank_zero():
            yield
        else:
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
                yield
    finally:
        destroy()


def run(args: argparse.Namespace) -> int:
    launched = launch_tp(args, batch_size=len(args.prompt))
    if launched is not None:
        return launched
    with rank_zero_output():
        return _generate(args)


def _generate(args: argparse.Namespace) -> int:
    from graphllm.generate import (
        GenerationStats,
        StaticGenerator,
        bucket,
        generate_text,
    )

    sampling = sampling_from(args)
    if args.max_new_tokens < 1:
        raise GraphllmError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    net, enc, eos = load(args)
    rows = [enc.encode(p) for p in args.prompt]
    limit = net.config.max_position_embeddings
    max_len = args.max_len or min(bucket(max(len(r) for r in rows), min_bucket=16, max_len=limit)
                                  + args.max_new_tokens, limit)
    gen = StaticGenerator(net, batch_size=len(rows), max_len=max_len, backend=args.backend,
                          pad_id=eos[0] if eos else 0, tp=args.tp, dtype=args.dtype)
    stats = GenerationStats()
    single = len(rows) == 1

    def on_text(i: int, piece: str) -> None:
        if single:
            sys.stdout.write(piece)
            sys.stdout.flush()

    done = generate_text(gen, enc, rows, max_new_tokens=args.max_new_tokens, sampling=sampling, stop=args.stop,
                         eos_ids=eos, on_text=on_text, stats=stats)
    if single:
        print()
    else:  # several rows stream at once; print each whole, in prompt order
        for i, c in enumerate(done):
            print(f"--- [{i}] {args.prompt[i]!r} ({c.finish_reason})\n{c.text}")
    report(stats)
    return 0
