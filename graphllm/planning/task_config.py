"""The plan's training objective: what the compiled step computes from a batch (graphllm/tasks/).

- `lm`: next-token cross-entropy on the labels (pretraining, SFT; PRM data trains this way too).
- `dpo`: Direct Preference Optimization (Rafailov et al. 2023) on chosen/rejected pairs against a frozen
  reference: sigmoid (the paper), ipo (Azar et al. 2023) or hinge (SLiC) loss, with label smoothing
  (conservative DPO).
- `simpo`: SimPO (Meng et al. 2024): length-normalised log-probabilities, a target margin gamma, no reference.
- `rm`: an outcome reward model: a scalar head on the last token, Bradley–Terry loss on pairs.
- `prm`: a process reward model: classification at the step-tag positions `graphllm preprocess prm` marks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from graphllm.errors import GraphllmError
from graphllm.options import check_fields, option

TASKS = ("lm", "dpo", "simpo", "rm", "prm")
PAIRWISE_TASKS = ("dpo", "simpo", "rm")
"""Tasks trained on chosen/rejected pairs (`graphllm preprocess pairwise` data)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskConfig:
    """What the training step optimises (`--task`), with the options of each objective."""

    kind: Literal["lm", "dpo", "simpo", "rm", "prm"] = option(
        "lm", flag="--task", help="training objective: lm (next-token cross-entropy: pretraining, SFT), dpo, simpo, "
                                  "rm (outcome reward model), prm (process reward model)")
    dpo_beta: float = option(0.1, minimum=0, help="dpo: β, the strength of the KL constraint to the reference")
    dpo_loss: Literal["sigmoid", "ipo", "hinge"] = option("sigmoid", help="dpo: the loss on the log-ratio margin")
    dpo_label_smoothing: float = option(0.0, minimum=0, maximum=0.5,
                                        help="dpo (sigmoid): probability that a preference label is flipped")
    simpo_beta: float = option(2.0, minimum=0, help="simpo: β, the scale of the length-normalised reward")
    simpo_gamma: float = option(0.5, minimum=0, help="simpo: γ, the target reward margin")
    reference: Literal["graph", "precompute"] = option(
        "graph", help="dpo: reference log-probs from a frozen forward graph compiled once (with LoRA: the base, "
                      "adapters off), or precomputed in one pass over the data before training")

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def pairwise(self) -> bool:
        return self.kind in PAIRWISE_TASKS

    def check_shapes(self, *, batch_size: int) -> None:
        """Pairwise tasks take pairs: each micro-batch holds whole (chosen, rejected) pairs."""
        if self.pairwise and batch_size % 2:
            raise GraphllmError(f"--task {self.kind} trains on (chosen, rejected) pairs, two rows each: --batch-size "
                                f"must be even, got {batch_size}")
