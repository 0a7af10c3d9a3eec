"""lm-evaluation-harness's `LM` methods on a graphllm `Scorer`, without importing lm_eval.

Requests are duck-typed: anything with `.args` as the harness's `Instance` has it —
`(context, continuation)` for loglikelihood, `(text,)` for loglikelihood_rolling,
`(context, gen_kwargs)` for generate_until. `graphllm.eval.lm_eval_adapter.GraphllmLM` mixes this into
lm_eval's `LM` base class; keeping the methods here lets them be tested where lm_eval is not installed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from graphllm.errors import GraphllmError

logger = logging.getLogger("graphllm.eval")
DEFAULT_MAX_GEN_TOKS = 256  # the harness's default when a task sets no max_gen_toks


class HarnessMethods:
    """loglikelihood / loglikelihood_rolling / generate_until over `self.scorer` (a GraphScorer)."""

    scorer: Any

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.scorer.loglikelihood([tuple(r.args[:2]) for r in requests])

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        return self.scorer.loglikelihood_rolling([r.args[0] for r in requests])

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy generation; requests sharing stop strings and budget are generated as one batch."""
        groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(generation_key(r.args[1] if len(r.args) > 1 else {}), []).append(i)
        out = [""] * len(requests)
        for (until, budget), idx in groups.items():
            texts = self.scorer.generate_until([requests[i].args[0] for i in idx], list(until), budget)
            for i, text in zip(idx, texts):
                out[i] = text
        return out


def generation_key(gen_kwargs: dict[str, Any]) -> tuple[tuple[str, ...], int]:
    """(stop strings, max new tokens) from the harness's gen_kwargs; sampling settings are ignored, loudly."""
    if not isinstance(gen_kwargs, dict):
        raise GraphllmError(f"generate_until: gen_kwargs must be a dict, got {type(gen_kwargs).__name__}")
    kw = dict(gen_kwargs)
    until = kw.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    budget = int(kw.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
    do_sample = kw.pop("do_sample", False)
    temperature = kw.pop("temperature", 0.0)
    if do_sample or (temperature not in (None, 0, 0.0)):
        logger.warning("graphllm eval adapter: decodes greedily; ignoring do_sample=%s temperature=%s",
                       do_sample, temperature)
    if kw:
        logger.warning("graphllm eval adapter: ignoring generation settings %s", ", ".join(sorted(kw)))
    return tuple(until), budget
