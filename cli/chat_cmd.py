"""`graphllm chat`: multi-turn chat with the tokenizer's chat template, replies streamed as produced.

Each turn renders the whole history with the template and prefills it (one prefill graph per length
bucket, compiled once); the decode graph is compiled once for the session. `/reset` clears the
history, `/exit` (or end of input) quits. When the history no longer fits the cache, the oldest
turns are dropped (the system message is kept) and a note says so.

With --tp N the command re-runs itself as N ranks; rank 0 reads stdin and prints, and every line it
reads is broadcast to the other ranks, which run the same turns silently.
"""

from __future__ import annotations

import argparse
import sys

from graphllm.cli.generate_cmd import (
    add_model_args,
    launch_tp,
    load,
    rank_zero_output,
    report,
    sampling_from,
)

from graphllm.errors import GraphllmError


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="multi-turn chat with streaming replies (docs/inference.md)")
    add_model_args(p, max_new_tokens=256)
    p.add_argument("--system", default=None, help="system message at the start of the history")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    launched = launch_tp(args, batch_size=1)
    if launched is not None:
        return launched
    with rank_zero_output():
        return _chat(args)


def _read_line(tp: int) -> tuple[str, bool]:
    """The next input line ("" at its end) and whether stdin is a terminal: rank 0's, on every rank."""
    from graphllm.launch import is_rank_zero
    from graphllm.parallel.groups import broadcast_object

    if tp == 1:
        return sys.stdin.readline(), sys.stdin.isatty()
    got = (sys.stdin.readline(), sys.stdin.isatty()) if is_rank_zero() else None
    return broadcast_object(got)


def _chat(args: argparse.Namespace) -> int:
    from graphllm.generate import GenerationStats, StaticGenerator, generate_text

    sampling = sampling_from(args)
    net, enc, eos = load(args)
    if getattr(enc, "chat_template", None) is None or not hasattr(enc, "render_chat"):
        raise GraphllmError(f"{args.tokenizer or args.model}: the tokenizer has no chat template; chat needs an HF "
                            "checkpoint (or --tokenizer dir) whose tokenizer defines one")
    max_len = args.max_len or min(2048, net.config.max_position_embeddings)
    if args.max_new_tokens >= max_len:
        raise GraphllmError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in --max-len {max_len}")
    gen = StaticGenerator(net, batch_size=1, max_len=max_len, backend=args.backend,
                          pad_id=eos[0] if eos else 0, tp=args.tp, dtype=args.dtype)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    interactive = sys.stdin.isatty()  # rank 0's is what counts; the others print nothing
    print(f"chatting with {args.model} ({args.backend}); /reset clears the history, /exit quits", file=sys.stderr)
    while True:
        if interactive:
            print(">>> ", end="", file=sys.stderr, flush=True)
        line, _ = _read_line(args.tp)
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history.clear()
            print("[history cleared]", file=sys.stderr, flush=True)
            continue
        history.append({"role": "user", "content": text})
        ids = _fit(enc, system, history, gen.max_prompt_len(args.max_new_tokens))
        if not interactive:
            print(f">>> {text}", flush=True)
        stats = GenerationStats()

        def on_text(_: int, piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        reply = generate_text(gen, enc, [ids], max_new_tokens=args.max_new_tokens, sampling=sampling,
                              stop=args.stop, eos_ids=eos, on_text=on_text, stats=stats)[0]
        print(flush=True)
        report(stats)
        history.append({"role": "assistant", "content": reply.text})
    return 0


def _fit(enc, system: list[dict], history: list[dict], limit: int) -> list[int]:
    """Token ids of the rendered conversation, dropping the oldest exchanges until it fits `limit`."""
    while True:
        ids = enc.encode(enc.render_chat(system + history, add_generation_prompt=True))
        if len(ids) <= limit:
            return ids
        if len(history) <= 1:
            history.pop()
            raise GraphllmError(f"the message is {len(ids)} tokens; with --max-new-tokens the cache holds a prompt "
                                f"of at most {limit}: raise --max-len or send a shorter message")
        del history[:2]  # oldest user message and its reply
        print("[oldest turn dropped to fit the cache]", file=sys.stderr, flush=True)
