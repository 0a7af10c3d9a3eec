"""graphllm.models: decoder-only causal LMs, dense (llama, qwen2, qwen3, mistral, phi3, glm4, gemma2,
gemma3_text) and mixture-of-experts (mixtral, qwen3_moe: models/moe.py; deepseek_v3 with multi-latent attention:
models/mla.py, models/deepseek_moe.py)

A leaf layer: imports torch, safetensors and graphllm.errors only (never transformers).
"""

from .config import ModelConfig
from .llama import LlamaForCausalLM
from .presets import PRESETS
from .registry import build_model, load_config, load_model
from .rope import rope_inv_freq
from .weights import load_state_dict_into, read_hf_state_dict, save_hf

__all__ = [
    "PRESETS",
    "LlamaForCausalLM",
    "ModelConfig",
    "build_model",
    "load_config",
    "load_model",
    "load_state_dict_into",
    "read_hf_state_dict",
    "rope_inv_freq",
    "save_hf",
]
