"""Multi-token prediction (DeepSeek-V3's MTP) in training: the plan's MTP section, typed and validated.

`layers` D builds D MTP modules after the decoder (models/decoder.py MtpLayer; weights models/mtp_weights.py):
module d predicts the token d + 1 ahead from the previous depth's hidden state and the embedding of the token d
ahead, through the shared embedding and LM head. The training loss becomes

    loss = LM cross-entropy (+ aux loss) + loss_weight · mean over d of module d's cross-entropy

and the mean MTP cross-entropy is logged as "mtp/loss". Generation and evaluation use the main model only. Under
--pp the modules run on the last stage (the embedding of the tokens ahead is looked up on the first). Under --tp a
module's layer is split like the decoder's (passes/tp_plan.py matches model.mtp.<k> as a layer) and its lookups and
LM head use the vocab-parallel embedding and head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from graphllm.errors import GraphllmError
from graphllm.options import check_fields, option


@dataclass(frozen=True, slots=True, kw_only=True)
class MtpConfig:
    """Multi-token prediction modules and the weight of their loss."""

    FLAG_PREFIX: ClassVar[str] = "mtp"

    layers: int = option(0, metavar="N", minimum=0,
                         help="multi-token prediction modules trained beside the model (DeepSeek-V3's MTP): module d "
                              "predicts the token d + 1 ahead; their weights load from the checkpoint's "
                              "model.layers.<L + d - 1>.* where present, else are drawn from --seed")
    loss_weight: float = option(0.1, metavar="W", minimum=0,
                                help="weight of the MTP modules' mean cross-entropy in the training loss "
                                     "(DeepSeek-V3: 0.3, then 0.1)")

    def __post_init__(self) -> None:
        check_fields(self)

    def check_plan(self, plan: Any) -> None:
        """Refuse what MTP does not compose with yet (one line naming the flag and the fix)."""
        if not self.layers:
            return
        if plan.task.kind != "lm":
            raise GraphllmError(f"--mtp-layers {self.layers} with --task {plan.task.kind} is not supported yet (its "
                                "objective is not the language-model loss the modules add to); drop one of them")
