"""The default pass pipeline: one ordered, readable list."""

from graphllm.passes.fold_constants import fold_constants
from graphllm.passes.fuse_add_rms_norm import fuse_add_rms_norm
from graphllm.passes.fuse_attention import fuse_attention
from graphllm.passes.fuse_rms_norm import fuse_rms_norm
from graphllm.passes.fuse_rope import fuse_rope
from graphllm.passes.fuse_swiglu import fuse_swiglu
from graphllm.passes.manager import GraphPass


def default_passes() -> list[GraphPass]:
    """The model-stage passes graphllm runs unless told otherwise, in order."""
    return [
        fuse_rms_norm,   # first: the norm's pow/mean/rsqrt chain is self-contained
        fuse_add_rms_norm,  # right after: the residual add feeding a raised norm joins it
        fuse_swiglu,     # independent of the others; before parallel passes so TP shards one op
        fuse_rope,       # before attention: rope feeds q and k, attention must see the rope op outputs
        fuse_attention,  # last fusion: SDPA / eager softmax attention with GQA folded back
        fold_constants,  # after the fusions (they read the causal mask's construction): RoPE tables, masks
    ]
