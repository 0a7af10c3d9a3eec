"""The default fusion passes: one ordered, readable list, each with the reason for its place.

`default_passes()` is what users extend (`default_passes() + [my_pass]`); the whole pipeline of a plan
(parallel sharding, lowering, partitioning, train-graph passes) is assembled around it by
graphllm.pass_pipeline.build_pipeline.
"""

from graphllm.passes.fold_constants import fold_constants
from graphllm.passes.fuse_add_rms_norm import fuse_add_rms_norm
from graphllm.passes.fuse_attention import fuse_attention
from graphllm.passes.fuse_linear_cross_entropy import fuse_linear_cross_entropy
from graphllm.passes.fuse_rms_norm import fuse_rms_norm
from graphllm.passes.fuse_rope import fuse_rope
from graphllm.passes.fuse_swiglu import fuse_swiglu
from graphllm.passes.manager import GraphPass

DEFAULT_PASSES: tuple[tuple[GraphPass, str], ...] = (
    (fuse_rms_norm, "first: the norm's pow/mean/rsqrt chain is self-contained"),
    (fuse_add_rms_norm, "right after: the residual add feeding a raised norm joins it"),
    (fuse_swiglu, "independent of the others; before the parallel passes, so TP shards one op"),
    (fuse_rope, "before attention: rope feeds q and k, attention must see the rope op outputs"),
    (fuse_attention, "last fusion: SDPA / eager softmax attention with GQA folded back"),
    (fold_constants, "after the fusions (they read the causal mask's construction): RoPE tables, masks"),
    (fuse_linear_cross_entropy, "before lora and sharding: the LM head and its loss become one op, computed by "
                                "vocabulary chunks (tensor_parallel shards it by vocabulary)"),
)


def default_passes() -> list[GraphPass]:
    """The model-stage passes graphllm runs unless told otherwise, in order."""
    return [p for p, _ in DEFAULT_PASSES]


def why_default(name: str) -> str | None:
    """The reason a default pass sits where it does (None for passes not in the default list)."""
    return next((why for p, why in DEFAULT_PASSES if p.name == name), None)
