"""How a mixture-of-experts model's tokens reach their experts: the plan's MoE section, typed and validated.

`dispatcher` is how expert parallelism (--ep > 1, passes/expert_parallel.py) moves tokens: `allgather` gathers
the ep group's tokens on every rank and reduce-scatters the outputs back (dropless, static, ep·T·H rows each
way); `alltoall` sends each rank only the rows for its experts, in a static [ep, C, H] buffer of C rows per
destination (one all_to_all each way): C is the worst case T·min(k, E/ep) when dropless, or E/ep × each
expert's capacity with `capacity_factor`. `capacity_factor` F limits every expert to ceil(F·T·k/E) of a
micro-batch's token-expert pairs (T tokens of the rank, k experts each, E experts): pairs past that, in token
order (Megatron's "position" drop policy), are dropped — their token gets no output from that expert
(passes/moe_capacity.py). Without it routing is dropless, as transformers computes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from graphllm.errors import GraphllmError
from graphllm.options import check_fields, option


COUNTS_PREFIX = "_moe_tokens/"
"""Metric names of the per-expert pair counts (`_moe_tokens/<bias buffer>/<expert>`, passes/moe_stats.py): not
logged (a leading "_"), read by the expert-bias update (graphllm.parallel.expert_bias)."""


def _check_capacity(value: float | None) -> None:
    if value is not None and value <= 0:
        raise GraphllmError(f"--moe-capacity-factor {value} must be > 0 (each expert's share of a micro-batch's "
                            "token-expert pairs, e.g. 1.25); leave it out for dropless routing")


@dataclass(frozen=True, slots=True, kw_only=True)
class MoeConfig:
    """Token dispatch and expert capacity of mixture-of-experts layers."""

    FLAG_PREFIX: ClassVar[str] = "moe"

    dispatcher: Literal["allgather", "alltoall"] = option(
        "allgather", help="how --ep moves tokens to their experts: all-gather the group's tokens and "
                          "reduce-scatter the outputs, or an all-to-all of each expert's rows (static buffers: "
                          "worst-case padded when dropless, bounded by --moe-capacity-factor)")
    capacity_factor: float | None = option(
        None, metavar="F", check=_check_capacity,
        help="each expert takes at most ceil(F·tokens·top-k/experts) token-expert pairs of a micro-batch, the "
             "rest dropped in token order (default: dropless)")

    bias_update_rate: float | None = option(
        None, metavar="RATE", minimum=0,
        help="aux-free load balancing (DeepSeek-V3): after each step every router's e_score_correction_bias moves by "
             "RATE towards balance, +RATE for an expert below the mean load and -RATE above (e.g. 0.001)")
    z_loss_coeff: float | None = option(
        None, metavar="C", minimum=0,
        help="add C × the router z-loss (ST-MoE: each MoE layer's mean over tokens of logsumexp(router logits)², "
             "summed over layers) to the training loss, e.g. 0.001")
    seq_aux_loss_coeff: float | None = option(
        None, metavar="ALPHA", minimum=0,
        help="add ALPHA × DeepSeek-V3's sequence-wise balance loss (per sequence Σ_e f_e·P_e, averaged over "
             "sequences and summed over MoE layers) to the training loss, e.g. 0.0001")
    stats: Literal["on", "off"] = option(
        "on", help="training graphs of MoE models return each step's load balance beside the loss (moe/max_load, "
                   "moe/dropped in the metrics log)")

    def __post_init__(self) -> None:
        check_fields(self)

    def check_model(self, cfg: Any) -> None:
        """Refuse router losses on a model without routers (one line naming the flag and the fix)."""
        losses = [f"--moe-{name.replace('_', '-')} {value:g}" for name, value in
                  (("z_loss_coeff", self.z_loss_coeff), ("seq_aux_loss_coeff", self.seq_aux_loss_coeff)) if value]
        if not losses:
            return
        if not getattr(cfg, "num_experts", 0):
            raise GraphllmError(f"{losses[0]}: {cfg.model_type} is dense (no router to balance); leave it out")

    def check_plan(self, plan: Any) -> None:
        """Refuse what expert capacity does not compose with yet (one line naming the flags and the fix)."""
        lay = plan.layout
        split = "--sequence-parallel" if lay.sequence_parallel else f"--cp {lay.cp}" if lay.cp > 1 else None
        if self.capacity_factor is not None and split:
            raise GraphllmError(f"--moe-capacity-factor {self.capacity_factor:g} with {split} is not supported yet "
                                "(each rank would count the capacity on its part of the sequence, not on the "
                                "micro-batch); drop one of them")

    def capacity(self, tokens: int, top_k: int, experts: int) -> int | None:
        """Pairs each expert takes from `tokens` tokens (None: dropless)."""
        if self.capacity_factor is None:
            return None
        return max(1, math.ceil(round(self.capacity_factor * tokens * top_k / experts, 9)))  # 1.25·64·2/8 is 20

    def describe(self) -> str:
        drop = f"capacity {self.capacity_factor:g}" if self.capacity_factor is not None else "dropless"
        return f"{self.dispatcher} {drop}"
