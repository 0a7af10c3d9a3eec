"""The llama-family names of the decoder (llama, qwen2, mistral, and every other supported family).

The implementation lives in models/decoder.py (model, layers), models/attention.py, models/layers.py
(RMSNorm, MLP, RoPE forms) and models/masks.py; these names stay importable from here.
"""

from __future__ import annotations

from .attention import Attention as LlamaAttention
from .decoder import DecoderForCausalLM as LlamaForCausalLM
from .decoder import DecoderLayer as LlamaDecoderLayer
from .decoder import DecoderModel as LlamaModel
from .decoder import IGNORE_INDEX
from .layers import GatedMLP as LlamaMLP
from .layers import RMSNorm as LlamaRMSNorm
from .layers import repeat_kv, rotate_half
from .masks import packed_causal_mask

__all__ = ["IGNORE_INDEX", "LlamaAttention", "LlamaDecoderLayer", "LlamaForCausalLM", "LlamaMLP", "LlamaModel",
           "LlamaRMSNorm", "packed_causal_mask", "repeat_kv", "rotate_half"]
