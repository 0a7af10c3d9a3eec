"""Scoring text with a model compiled to static graphs.

The scorer protocol (what the evaluation loop needs from a model) is text in, numbers/text out:

- `loglikelihood([(context, continuation), ...]) -> [(sum of log p(continuation tokens), is_greedy)]`
- `generate_until(prompts, stop, max_new_tokens) -> [generated text, cut before the first stop string]`

`GraphScorer` implements it on `graphllm.compile(model, ids)` graphs. Graphs are static, so requests
are grouped into fixed shapes: a batch is always `batch_size` rows (short batches are filled with pad
rows whose results are dropped) and the sequence length is rounded up to a power of two between
`min_bucket` and `max_length`. A run therefore compiles a handful of graphs, each once, and reuses them.
Right-padding is exact for causal log-likelihood: position t attends only to positions ≤ t, so pad
tokens after a row's last real token change none of the logits that are read.

Tokenization follows lm-evaluation-harness (`_encode_pair`): trailing spaces of the context move to
the continuation, the pair is encoded whole, and the continuation tokens are what follows the
context's own encoding; an empty context is replaced by the EOS token. Inputs longer than the
longest graph keep their last `max_length` tokens.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn

from graphllm.errors import GraphllmError
from graphllm.generate.engine import bucket

logger = logging.getLogger("graphllm.eval")


class Scorer(Protocol):
    """What `graphllm.eval` needs from a model (text level, so test doubles need no tokenizer)."""

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]: ...

    def generate_until(self, prompts: Sequence[str], stop: Sequence[str], max_new_tokens: int) -> list[str]: ...


class Tokenizer(Protocol):
    eos_id: int | None
    bos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def bucket_length(n: int, *, min_bucket: int, max_length: int) -> int:
    """The static sequence length for an input of n tokens: the generator's prompt buckets (the next power
    of two ≥ n, ≥ min_bucket, capped), so scoring and generation compile the same shapes."""
    return bucket(n, min_bucket=min_bucket, max_len=max_length)


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` before the earliest stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def rolling_windows(tokens: list[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs covering `tokens` once, as lm-evaluation-harness scores a text for
    perplexity (`get_rolling_token_windows` with context_len 1, then `make_disjoint_window`): the first window
    predicts up to `max_length` tokens from `prefix`; each later one predicts the next `max_length` tokens (the
    last: what is left) from the tokens before it, so that context + continuation fill `max_length` + 1."""
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    out = [([prefix], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_length)
        end = done + n
        out.append((tokens[end - max_length - 1: end - n], tokens[done:end]))
        done = end
    return out


class GraphScorer:
    """The scorer protocol on compiled static graphs of `model`'s forward (see the module docstring)."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, *, batch_size: int = 8, backend: str = "eager",
                 max_length: int | None = None, min_bucket: int = 32, amp: str = "fp32",
                 prefix_token_id: int | None = None) -> None:
        if batch_size < 1:
            raise GraphllmError(f"--batch-size must be at least 1, got {batch_size}")
        cfg = getattr(model, "config", None)
        limit = getattr(cfg, "max_position_embeddings", None) or 2048
        self.max_length = min(max_length or limit, limit)
        if self.max_length < 2:
            raise GraphllmError(f"--max-length must be at least 2, got {self.max_length}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.backend = backend
        self.amp = amp
        self.min_bucket = min(min_bucket, self.max_length)
        self.pad_id = tokenizer.eos_id if tokenizer.eos_id is not None and tokenizer.eos_id >= 0 else 0
        bos = getattr(tokenizer, "bos_id", None)
        self.prefix_id = prefix_token_id if prefix_token_id is not None else bos if bos is not None else self.pad_id
        """What an empty context is: the token the first token of a text is predicted from. lm-evaluation-harness's
        rule (HFLM.prefix_token_id): its override, else the tokenizer's BOS, else EOS."""
        self.graphs: dict[tuple[int, int], nn.Module] = {}
        self.stats: dict[str, float] = {"rows": 0, "calls": 0, "compile_s": 0.0, "run_s": 0.0, "truncated": 0}
        """Log-likelihood rows scored (pad rows excluded), graph calls made (fallback generation included),
        seconds spent compiling graphs (first call included) and running them, and inputs (a request's context +
        continuation, or a prompt) longer than max_length that kept only their last tokens."""
        self.on_batch: Callable[[int, int], None] | None = None
        """Progress callback: (rows done, rows) after each log-likelihood batch."""
        self.device = next(model.parameters()).device

    # -- graphs ---------------------------------------------------------------------------------
    def logits(self, ids_BL: torch.Tensor) -> torch.Tensor:
        """Logits [B, L, V] of a [batch_size, bucket] batch, on the graph compiled for that shape."""
        key = tuple(ids_BL.shape)
        graph = self.graphs.get(key)
        if graph is None:
            from graphllm.compile import compile as compile_model

            logger.info("eval: compiling the forward for batch %d × %d tokens (%s)", key[0], key[1], self.backend)
            t0 = time.perf_counter()
            with torch.no_grad():
                graph = compile_model(self.model, ids_BL, backend=self.backend, amp=self.amp, purpose="eval")
                graph(ids_BL)  # the backend compiles on the first call: keep that out of run_s
            self.stats["compile_s"] += time.perf_counter() - t0
            self.graphs[key] = graph
        self.stats["calls"] += 1
        t0 = time.perf_counter()
        with torch.no_grad():
            out = graph(ids_BL)
        self.stats["run_s"] += time.perf_counter() - t0
        return out

    def _batch(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Rows right-padded into a [batch_size, bucket] tensor (pad rows fill a short batch)."""
        length = bucket_length(max(len(r) for r in rows), min_bucket=self.min_bucket, max_length=self.max_length)
        ids = torch.full((self.batch_size, length), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return ids.to(self.device)

    # -- log-likelihood -------------------------------------------------------------------------
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        if not context:
            return [self.prefix_id], self.tokenizer.encode(continuation)
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context)
        return ctx, whole[len(ctx):]

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in requests])

    def loglikelihood_tokens(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether greedy decoding would produce it, per pair.

        Pairs whose model inputs are identical (the choices " A" … " D" of one question: same context,
        one-token continuations) share one row; each reads its own target positions from its logits.
        """
        readers: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}  # input -> [(pair index, targets)]
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise GraphllmError("a continuation encodes to no tokens; cannot score an empty answer")
            if len(cont) > self.max_length:
                raise GraphllmError(f"a continuation of {len(cont)} tokens exceeds --max-length {self.max_length}")
            self.stats["truncated"] += len(ctx) + len(cont) > self.max_length + 1
            full = (ctx + cont)[-(self.max_length + 1):]
            readers.setdefault(tuple(full[:-1]), []).append((i, cont))
        # longest first: each batch's bucket fits its rows tightly, and the largest graph compiles first
        rows = sorted(readers, key=len, reverse=True)
        out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start: start + self.batch_size]
            ids = self._batch(chunk)
            logits_BLV = self.logits(ids)
            self.stats["rows"] += len(chunk)
            for b, inp in enumerate(chunk):
                for i, cont in readers[inp]:
                    logp_NV = logits_BLV[b, len(inp) - len(cont): len(inp)].float().log_softmax(-1)
                    tgt = torch.tensor(cont, device=logp_NV.device)
                    score = logp_NV.gather(-1, tgt[:, None]).sum().item()
                    out[i] = (score, bool((logp_NV.argmax(-1) == tgt).all()))
            if self.on_batch is not None:
                self.on_batch(min(start + self.batch_size, len(rows)), len(rows))
        return out

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """Log-likelihood of each whole text (perplexity) over lm-evaluation-harness's rolling windows
        (`rolling_windows`): the first token is predicted from the prefix token, every other from the text
        before it, at most `max_length` tokens of input per window."""
        pairs: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for t, text in enumerate(texts):
            windows = rolling_windows(self.tokenizer.encode(text), self.prefix_id, self.max_length)
            pairs += windows
            owner += [t] * len(windows)
        totals = [0.0] * len(texts)
        for t, (score, _) in zip(owner, self.loglikelihood_tokens(pairs)):
            totals[t] += score
        return totals

    # -- generation -----------------------------------------------------------------------------
    def generate_until(self, prompts: Sequence[str], stop: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy continuations of `prompts`, each cut before its first stop string.

        Uses graphllm.generate's prefill/decode graphs when that package is importable (checked on
        each call), else `greedy_generate`, a fallback that re-runs the full compiled forward per token.
        """
        fast = static_generator()
        if fast is not None:
            texts = fast(self, list(prompts), stop=list(stop), max_new_tokens=max_new_tokens)
            return [cut_at_stop(t, stop)[0] for t in texts]
        return self.greedy_generate(prompts, stop, max_new_tokens)

    def greedy_generate(self, prompts: Sequence[str], stop: Sequence[str], max_new_tokens: int) -> list[str]:
        """Fallback greedy decoding: per step, the compiled forward over each batch of unfinished rows
        (rows grow into larger buckets as needed; no KV cache, so it costs O(length²) per row)."""
        keep = max(self.max_length - max_new_tokens, 1)
        encoded = [self.tokenizer.encode(p) for p in prompts]
        self.stats["truncated"] += sum(len(e) > keep for e in encoded)
        rows = [e[-keep:] or [self.pad_id] for e in encoded]
        new: list[list[int]] = [[] for _ in prompts]
        texts = ["" for _ in prompts]
        live = list(range(len(prompts)))
        for _ in range(max_new_tokens):
            if not live:
                break
            for start in range(0, len(live), self.batch_size):
                chunk = live[start: start + self.batch_size]
                inputs = [(rows[i] + new[i])[-self.max_length:] for i in chunk]
                ids = self._batch(inputs)
                logits_BLV = self.logits(ids)
                for b, i in enumerate(chunk):
                    new[i].append(int(logits_BLV[b, len(inputs[b]) - 1].argmax()))
            finished = set()
            for i in live:
                if new[i][-1] == self.tokenizer.eos_id:
                    new[i].pop()
                    finished.add(i)
                texts[i], hit = cut_at_stop(self.tokenizer.decode(new[i]), stop)
                if hit:
                    finished.add(i)
            live = [i for i in live if i not in finished]
        return texts


def static_generator():
    """graphllm.generate's batched greedy entry point when that package is installed, else None.

    The contract (duck-typed, checked at call time): `graphllm.generate.generate_until(scorer,
    prompts, *, stop, max_new_tokens) -> list[str]`, reading the scorer's `model`, `tokenizer`,
    `backend`, `amp`, `batch_size`, `max_length` and `pad_id`.
    """
    try:
        mod = importlib.import_module("graphllm.generate")
    except ImportError:
        return None
    fn = getattr(mod, "generate_until", None)
    return fn if callable(fn) else None
