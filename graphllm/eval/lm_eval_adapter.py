"""lm-evaluation-harness model `graphllm`: evaluate a graphllm model on any harness task.

Importable only where lm_eval is installed (it is not a graphllm dependency). Importing this module
registers the model name `graphllm` with the harness:

    import lm_eval
    from graphllm.eval.lm_eval_adapter import GraphllmLM

    lm_eval.simple_evaluate(model=GraphllmLM(model="path/to/hf_dir", backend="inductor", batch_size=8),
                            tasks=["hellaswag"])
    # or, once imported: simple_evaluate(model="graphllm", model_args="model=path/to/hf_dir,backend=eager")

The methods are
`graphllm.eval.harness_requests.HarnessMethods` on a `GraphScorer`: the model's forward compiled by
`graphllm.compile` at bucketed static shapes; greedy generation.
"""

from __future__ import annotations

import logging

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # keep the reason: lm_eval's own imports can fail for other causes
    raise ImportError(f"graphllm.eval.lm_eval_adapter needs lm-evaluation-harness (pip install lm_eval): {e}") from e

from graphllm.eval.evaluate import build_scorer
from graphllm.eval.harness_requests import HarnessMethods
from graphllm.eval.scorer import GraphScorer

logger = logging.getLogger("graphllm.eval")


@register_model("graphllm")
class GraphllmLM(HarnessMethods, LM):
    """A graphllm model as an lm_eval `LM` (loglikelihood, loglikelihood_rolling, generate_until)."""

    def __init__(self, model: str = "tiny-llama", *, backend: str = "eager", batch_size: int | str = 8,
                 max_length: int | str | None = None, tokenizer: str | None = None, amp: str = "fp32",
                 scorer: GraphScorer | None = None, prefix_token_id: int | str | None = None, **ignored) -> None:
        """`prefix_token_id`: the token an empty context is, as HFLM's argument of that name (default: the
        tokenizer's BOS, else EOS)."""
        super().__init__()
        if ignored:  # the harness passes device/max_batch_size/... to every model
            logger.info("graphllm lm_eval adapter: ignoring %s", ", ".join(f"{k}={v}" for k, v in ignored.items()))
        if str(batch_size).startswith("auto"):
            logger.warning("graphllm lm_eval adapter: batch_size=auto is not supported (static graphs); using 8")
            batch_size = 8
        self.scorer = scorer or build_scorer(str(model), tokenizer=tokenizer, batch_size=int(batch_size),
                                             backend=backend, max_length=int(max_length) if max_length else None,
                                             amp=amp,
                                             prefix_token_id=int(prefix_token_id) if prefix_token_id is not None
                                             else None)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.scorer.tokenizer, "spec", "graphllm"))
