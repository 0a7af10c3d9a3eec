"""The families beyond llama: config.json parsing in both styles and back, the sliding-window mask convention,
the tensor-parallel plan for HF's fused modules, and bad config values refused in one line naming the field.
(Logits, compile, convert, generation and tp2 parity run per family from hf_parity.FAMILIES.)"""

from __future__ import annotations

import pytest
import torch
from transformers.masking_utils import sliding_window_causal_mask_function

from graphllm.errors import GraphllmError
from graphllm.models import ModelConfig
from graphllm.models.masks import sliding_window_mask
from graphllm.passes.tp_plan import LLAMA_PLAN, normalize, resolve_plan

from hf_parity import FAMILIES, SEQ, WINDOW, hf_model

NEW_FAMILIES = ["mistral-window", "phi3-longrope-partial", "phi3-window", "glm4", "gemma2", "gemma3"]


def test_window_mask_is_transformers_convention() -> None:
    """Query i sees keys i - W < j ≤ i: W keys, itself included (transformers' sliding_window_overlay)."""
    mask = sliding_window_mask(SEQ, WINDOW, torch.device("cpu"))
    fn = sliding_window_causal_mask_function(WINDOW)
    want = torch.tensor([[bool(fn(0, 0, torch.tensor(i), torch.tensor(j))) for j in range(SEQ)] for i in range(SEQ)])
    assert torch.equal(mask, want)
    assert mask.sum(-1).tolist() == [min(i + 1, WINDOW) for i in range(SEQ)]
    assert mask[SEQ - 1].nonzero().flatten().tolist() == list(range(SEQ - WINDOW, SEQ))


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_config_round_trips_through_transformers(family: str) -> None:
    hf = hf_model(family, "eager")
    cfg = ModelConfig.from_hf(hf.config.to_dict(), source=family)
    again = ModelConfig.from_hf(cfg.to_hf(), source="written")
    assert again == cfg
    reloaded = FAMILIES[family][0].from_dict(cfg.to_hf())  # transformers reads what graphllm writes
    assert ModelConfig.from_hf(reloaded.to_dict(), source="reloaded") == cfg


def test_gemma3_old_style_config() -> None:
    """Pre-transformers-5 spelling: rope_theta, rope_local_base_freq, rope_scaling, sliding_window_pattern."""
    d = {"model_type": "gemma3_text", "vocab_size": 16, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 7, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
         "rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
         "sliding_window": 512, "sliding_window_pattern": 6}
    cfg = ModelConfig.from_hf(d, source="old.json")
    assert cfg.rope_theta == 1e6 and cfg.rope_local_theta == 1e4
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert [cfg.window_of(i) for i in range(7)] == [512] * 5 + [None, 512]
    assert cfg.hidden_act == "gelu_pytorch_tanh" and cfg.tie_word_embeddings and cfg.qk_norm
    assert cfg.attn_logit_softcapping is None and cfg.query_pre_attn_scalar == 256


@pytest.mark.parametrize("model_type", ["phi3", "glm4", "gemma2", "gemma3_text"])
def test_transformers_tp_plan_maps_onto_graphllms(model_type: str) -> None:
    """HF's plan names fused modules (qkv_proj, gate_up_proj) and replicated q/k norms: mapped to the split names."""
    assert resolve_plan("hf", model_type) == normalize(LLAMA_PLAN)


def _d(**kw) -> dict:
    return {"model_type": "gemma2", "vocab_size": 16, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "head_dim": 16, **kw}


@pytest.mark.parametrize("kw,message", [
    (dict(hidden_activation="relu"), r"hidden_activation 'relu' in cfg.json is not supported; supported: silu, "),
    (dict(model_type="phi3", hidden_act="gelu_new"), r"hidden_act 'gelu_new' in cfg.json is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
     r"cfg.json: rope_type 'yarn' is not supported; supported: default, linear, llama3, longrope"),
    (dict(model_type="gemma3_text", rope_parameters={"full_attention": {"rope_type": "default"},
                                                     "sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
     r"rope_parameters.sliding_attention.rope_type 'linear' in cfg.json is not supported"),
    (dict(model_type="phi3", rope_parameters={"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0],
                                              "original_max_position_embeddings": 8}),
     r"cfg.json: rope_scaling short_factor has 1 entries; the rotary dims need 8"),
    (dict(layer_types=["sliding_attention"]), r"cfg.json: layer_types must list 2 entries"),
    (dict(use_bidirectional_attention=True), r"use_bidirectional_attention=true in cfg.json is not supported"),
    (dict(model_type="glm4", partial_rotary_factor=0.1), r"cfg.json: partial_rotary_factor=0.1 must give an even"),
])
def test_unsupported_config_values_are_refused(kw: dict, message: str) -> None:
    with pytest.raises(GraphllmError, match=message) as err:
        ModelConfig.from_hf(_d(**kw), source="cfg.json")
    assert "\n" not in str(err.value)


def test_fused_checkpoint_tensor_of_wrong_size_is_named(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from graphllm.models import load_model

    ckpt = tmp_path / "phi3"
    hf_model("phi3-window", "eager").save_pretrained(ckpt)
    sd = load_file(ckpt / "model.safetensors")
    sd["model.layers.0.self_attn.qkv_proj.weight"] = sd["model.layers.0.self_attn.qkv_proj.weight"][:-1]
    save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(GraphllmError, match=r"has tensor model\.layers\.0\.self_attn\.qkv_proj\.weight .*does not have"):
        load_model(ckpt)
