"""Text in, text out on a StaticGenerator: tokenisation, batching, EOS, stop strings and streaming."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from graphllm.generate.engine import GenerationStats, StaticGenerator
from graphllm.generate.sampling import SamplingConfig
from graphllm.generate.stream import TextStream


class TextTokenizer(Protocol):
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(kw_only=True, slots=True)
class Completion:
    """One prompt's generated text (stop string excluded) and tokens (EOS excluded)."""

    text: str
    token_ids: list[int]
    finish_reason: Literal["eos", "stop", "length"]


def eos_ids_of(model_source: str, tokenizer: TextTokenizer) -> list[int]:
    """The tokenizer's EOS plus the checkpoint's generation_config.json `eos_token_id` (int or list),
    as transformers' generate stops on all of them."""
    ids = {tokenizer.eos_id} if tokenizer.eos_id is not None and tokenizer.eos_id >= 0 else set()
    cfg = Path(model_source) / "generation_config.json"
    if cfg.is_file():
        eos = json.loads(cfg.read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
    return sorted(ids)


def generate_text(gen: StaticGenerator, tokenizer: TextTokenizer, prompts: Sequence[str | Sequence[int]], *,
                  max_new_tokens: int, sampling: SamplingConfig | None = None, stop: Sequence[str] = (),
                  eos_ids: Sequence[int] | None = None, on_text: Callable[[int, str], None] | None = None,
                  stats: GenerationStats | None = None) -> list[Completion]:
    """Complete each prompt (text, or token ids), `gen.batch_size` prompts per batch.

    `on_text(i, piece)` receives prompt i's text as it becomes printable (incremental detokenisation,
    see stream.py). A row ends at EOS, at a stop string (cut before it) or after `max_new_tokens`.
    """
    eos = list(eos_ids) if eos_ids is not None else (
        [tokenizer.eos_id] if tokenizer.eos_id is not None and tokenizer.eos_id >= 0 else [])
    rows = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    out: list[Completion] = []
    for start in range(0, len(rows), gen.batch_size):
        chunk = rows[start: start + gen.batch_size]
        streams = [TextStream(tokenizer.decode, stop) for _ in chunk]
        reasons: list[str] = ["length"] * len(chunk)
        steps = gen.run(chunk, max_new_tokens=max_new_tokens, sampling=sampling, eos_ids=eos, stats=stats)
        for tokens in steps:
            for b, tok in enumerate(tokens):
                if tok is None or streams[b].stopped or reasons[b] == "eos":
                    continue
                if tok in eos:
                    reasons[b] = "eos"
                    piece = streams[b].finish()
                else:
                    piece = streams[b].push(tok)
                    if streams[b].stopped:
                        reasons[b] = "stop"
                if piece and on_text is not None:
                    on_text(start + b, piece)
            if all(s.stopped or r == "eos" for s, r in zip(streams, reasons)):
                steps.close()
                break
        for b, s in enumerate(streams):
            rest = s.finish()
            if rest and on_text is not None:
                on_text(start + b, rest)
            out.append(Completion(text=s.text, token_ids=list(s.ids), finish_reason=reasons[b]))  # type: ignore[arg-type]
    return out


def generate_until(scorer, prompts: Sequence[str], *, stop: Sequence[str], max_new_tokens: int) -> list[str]:
    """graphllm.eval's generation hook: greedy completions on static graphs, one generator (and so one
    decode graph) per scorer. Prompts keep their last tokens when they would not fit the cache. A
    scorer with bf16 autocast uses its own fallback (`greedy_generate`): static generation does not autocast
    (bf16 there is weights stored in bf16, which would change the scorer's fp32 model under its other tasks)."""
    if getattr(scorer, "amp", "fp32") != "fp32":  # static generation does not autocast (engine.py)
        return scorer.greedy_generate(prompts, stop, max_new_tokens)
    gen = getattr(scorer, "_static_generator", None)
    if gen is None:
        gen = StaticGenerator(scorer.model, batch_size=scorer.batch_size, max_len=scorer.max_length,
                              backend=scorer.backend, amp=getattr(scorer, "amp", "fp32"),
                              pad_id=getattr(scorer, "pad_id", 0))
        scorer._static_generator = gen
    n_new = min(max_new_tokens, gen.max_len - 1)
    keep = gen.max_prompt_len(n_new)
    encoded = [scorer.tokenizer.encode(p) for p in prompts]
    if hasattr(scorer, "stats"):
        scorer.stats["truncated"] = scorer.stats.get("truncated", 0) + sum(len(e) > keep for e in encoded)
    rows = [e[-keep:] or [gen.pad_id] for e in encoded]
    done = generate_text(gen, scorer.tokenizer, rows, max_new_tokens=n_new, stop=stop)
    return [c.text for c in done]
