"""graphllm.models against transformers: logits and one SGD step match HF for llama, qwen2, mistral;
bad checkpoints and configs raise GraphllmError naming the problem."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from graphllm.errors import GraphllmError
from graphllm.models.weights import fuse_for_hf
from graphllm.models import (
    PRESETS,
    LlamaForCausalLM,
    ModelConfig,
    build_model,
    load_model,
    rope_inv_freq,
    save_hf,
)

from hf_parity import (COMMON as _COMMON, FAMILIES, FP32_PARITY_RTOL, VOCAB, batch as _batch, hf_model as _hf_model,
                       rel_err as _rel_err, save_hf_checkpoint as _save_hf, parity_through_step)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_parity_with_transformers(family: str, attn: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    repro = f"reproduce: python -m pytest tests/test_models.py -k '{request.node.name}'"
    hf = _hf_model(family, attn)
    ckpt = _save_hf(hf, family, tmp_path / "ckpt")
    if FAMILIES[family][3] is not None:
        assert (ckpt / "model.safetensors.index.json").is_file(), "expected a sharded checkpoint"

    ours = load_model(ckpt, attn_implementation=attn)
    assert isinstance(ours, LlamaForCausalLM)
    assert ours.source == str(ckpt.resolve())
    assert ours.config.attn_implementation == attn
    # every HF parameter name exists in ours with the same value
    hf_sd, our_sd = hf.state_dict(), fuse_for_hf(ours.state_dict(), ours.config)
    assert set(our_sd) == {k for k in hf_sd if "rotary_emb." not in k}
    for k, v in our_sd.items():
        assert torch.equal(v, hf_sd[k]), k
    rotary = hf.model.rotary_emb
    if ours.config.rope_local_theta is not None:  # Gemma 3: one inv_freq per layer type
        torch.testing.assert_close(ours.model.inv_freq_local, rotary.sliding_attention_inv_freq, rtol=0, atol=0)
    hf_inv_freq = getattr(rotary, "inv_freq", None)
    hf_inv_freq = rotary.full_attention_inv_freq if hf_inv_freq is None else hf_inv_freq
    torch.testing.assert_close(ours.model.inv_freq, hf_inv_freq, rtol=0, atol=0)
    if ours.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight

    ids, targets = _batch()
    err, err_step = parity_through_step(hf, ours, ours, ids, targets)
    assert err <= FP32_PARITY_RTOL, f"{family}/{attn} logits rel err {err:.2e}; {repro}"
    assert err_step <= FP32_PARITY_RTOL, f"{family}/{attn} logits after SGD step rel err {err_step:.2e}; {repro}"
    print(f"parity {family}/{attn}: logits {err:.2e}, after step {err_step:.2e}")


def test_rope_inv_freq_matches_transformers_linear() -> None:
    kwargs = dict(_COMMON, num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 4.0})
    hf_cfg = transformers.LlamaConfig(**kwargs)
    hf = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_cfg)
    cfg = ModelConfig.from_hf(hf_cfg.to_dict(), source="test")
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    torch.testing.assert_close(rope_inv_freq(cfg), hf.inv_freq, rtol=0, atol=0)


def test_from_hf_old_style_rope_keys() -> None:
    d = {"model_type": "llama", "vocab_size": 10, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 1, "num_attention_heads": 4, "rope_theta": 500000.0,
         "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192}}
    cfg = ModelConfig.from_hf(d, source="old.json")
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["rope_type"] == "llama3"
    assert cfg.head_dim == 8 and cfg.num_key_value_heads == 4
    # the written config round-trips, and identical configs share a fingerprint
    again = ModelConfig.from_hf(cfg.to_hf(), source="new.json")
    assert again == cfg and again.fingerprint() == cfg.fingerprint()
    assert ModelConfig.from_hf({**d, "hidden_size": 64}, "x").fingerprint() != cfg.fingerprint()


def test_presets_sizes() -> None:
    assert set(PRESETS) == {"tiny-llama", "small-llama"}
    small = LlamaForCausalLM(PRESETS["small-llama"]())
    assert 133e6 < small.num_params() < 135e6
    tiny = load_model("tiny-llama", seed=3)
    assert tiny.source == "tiny-llama"
    assert tiny.config.num_key_value_heads == 4 and tiny.config.head_dim == 32
    again = load_model("tiny-llama", seed=3)
    for (k, a), b in zip(tiny.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), f"init_weights(3) is not deterministic for {k}"
    assert not torch.equal(tiny.lm_head.weight, load_model("tiny-llama", seed=4).lm_head.weight)


def test_bf16_keeps_rope_buffer_fp32() -> None:
    cfg = dataclasses.replace(PRESETS["tiny-llama"](), num_hidden_layers=1)
    model = build_model(cfg, dtype=torch.bfloat16)
    assert model.model.inv_freq.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model(torch.zeros(1, 8, dtype=torch.long)).dtype == torch.bfloat16


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_torch_export_capture(attn: str) -> None:
    cfg = dataclasses.replace(PRESETS["tiny-llama"](), num_hidden_layers=1, attn_implementation=attn)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    ep = torch.export.export(model, (ids,))
    assert torch.equal(ep.module()(ids), model(ids))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert ("aten.scaled_dot_product_attention.default" in targets) == (attn == "sdpa"), targets


def test_models_does_not_import_transformers() -> None:
    code = "import sys, graphllm.models; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_save_hf_round_trip(tmp_path: Path) -> None:
    cfg = ModelConfig(model_type="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      attention_bias=True, tie_word_embeddings=True,
                      rope_scaling={"rope_type": "linear", "factor": 2.0})
    ours = build_model(cfg, seed=5)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    out = save_hf(ours, cfg, tmp_path / "out")
    save_hf(ours, cfg, tmp_path / "out")  # overwriting an existing checkpoint works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "temp dirs left behind"

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    ids, _ = _batch()
    with torch.no_grad():
        err = _rel_err(ours(ids), hf(input_ids=ids).logits)
    assert err <= FP32_PARITY_RTOL, f"save_hf round trip rel err {err:.2e}"
    back = load_model(out)
    assert back.config == cfg
    for k, v in ours.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


# ---- bad inputs ---------------------------------------------------------------------------------


@pytest.fixture
def llama_ckpt(tmp_path: Path) -> Path:
    return _save_hf(_hf_model("llama", "sdpa"), "llama", tmp_path / "ckpt")


def test_unknown_model_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(GraphllmError, match=r"model_type 'gpt2' in .*config.json is not supported; "
                                            r"supported: deepseek_v3, gemma2, gemma3_text, glm4, llama, mistral, mixtral, "
                                            r"phi3, qwen2, qwen3, qwen3_moe"):
        load_model(tmp_path)


def test_unsupported_rope_type() -> None:
    d = {"model_type": "llama", "vocab_size": 10, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 1, "num_attention_heads": 4,
         "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}
    with pytest.raises(GraphllmError, match=r"cfg.json.*rope_type 'yarn' is not supported"):
        ModelConfig.from_hf(d, source="cfg.json")


def test_bad_head_counts() -> None:
    with pytest.raises(GraphllmError, match=r"num_key_value_heads=3 must divide num_attention_heads=4"):
        ModelConfig(model_type="llama", vocab_size=10, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=3, head_dim=8)


def test_missing_tensor(llama_ckpt: Path) -> None:
    sd = load_file(llama_ckpt / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, llama_ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(GraphllmError, match=r"lacks tensor model\.layers\.1\.mlp\.up_proj\.weight.*another model"):
        load_model(llama_ckpt)


def test_unexpected_tensor(llama_ckpt: Path) -> None:
    sd = load_file(llama_ckpt / "model.safetensors")
    sd["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(sd, llama_ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(GraphllmError, match=r"q_norm\.weight .*does not have"):
        load_model(llama_ckpt)


def test_shape_mismatch(llama_ckpt: Path) -> None:
    cfg = json.loads((llama_ckpt / "config.json").read_text())
    cfg["intermediate_size"] = 128  # config of another size than the weights (96)
    (llama_ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GraphllmError, match=r"tensor model\.layers\.0\.mlp\.gate_proj\.weight in .* has shape "
                                            r"\(96, 64\), the model expects \(128, 64\)"):
        load_model(llama_ckpt)


def test_missing_shard(tmp_path: Path) -> None:
    ckpt = _save_hf(_hf_model("llama-bias-rope-llama3", "sdpa"), "llama-bias-rope-llama3", tmp_path / "ckpt")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (ckpt / shard).unlink()
    with pytest.raises(GraphllmError, match=rf"shard {shard} named in .* is missing"):
        load_model(ckpt)


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(GraphllmError, match=r"is neither a preset \(tiny-llama, small-llama\), a directory "
                                            r"with config\.json \(a directory without config\.json\), nor a Hub id"):
        load_model(tmp_path)
    with pytest.raises(GraphllmError, match=r"'foo' is neither a preset"):
        load_model("foo")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_sliding_window_beyond_the_window_matches_transformers(attn: str, tmp_path: Path) -> None:
    """Mistral with window 4 on 12 tokens: keys outside each query's window are masked as transformers does;
    up to the window no mask is built (the plain causal form, unchanged for short sequences)."""
    torch.manual_seed(0)
    hf_cfg = transformers.MistralConfig(**dict(_COMMON, num_key_value_heads=2, sliding_window=4))
    hf_cfg._attn_implementation = attn
    hf = transformers.MistralForCausalLM(hf_cfg).float()
    ours = load_model(_save_hf(hf, "mistral-gqa-headdim", tmp_path / "ckpt"), attn_implementation=attn)
    assert ours.config.sliding_window == 4
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        err = _rel_err(ours(ids), hf(input_ids=ids).logits)
        unwindowed = dataclasses.replace(ours.config, sliding_window=None)
        plain = LlamaForCausalLM(unwindowed)
        plain.load_state_dict(ours.state_dict())
        assert _rel_err(plain(ids), hf(input_ids=ids).logits) > 100 * FP32_PARITY_RTOL, "the window changed nothing"
    assert err <= FP32_PARITY_RTOL, f"mistral window 4 / {attn}: logits rel err {err:.2e}"
    short = torch.export.export(ours, (ids[:, :4],)).graph
    assert not any(n.target == torch.ops.aten.masked_fill.Scalar for n in short.nodes)
    if attn == "sdpa":
        sdpa = [n for n in short.nodes if n.target == torch.ops.aten.scaled_dot_product_attention.default]
        assert sdpa and all(n.kwargs.get("is_causal", n.args[5] if len(n.args) > 5 else False) for n in sdpa)
