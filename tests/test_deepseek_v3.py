"""DeepSeek-V3 (latent attention, group-limited sigmoid routing with shared experts) against transformers'
DeepseekV3ForCausalLM, beyond the per-family logits, compile and convert parity of hf_parity.FAMILIES: the router
on its own, the training loss and one AdamW step through the captured graph (eager and inductor), greedy
generation over the latent KV cache, config and weight round trips, and unsupported fields refused by name.

The config (hf_parity.FAMILIES["deepseek-v3"]) has a dense layer 0 (first_k_dense_replace=1), 8 experts in 4
groups of which 2 are kept, q_lora_rank set and YaRN RoPE with mscale_all_dim; the routing bias is drawn here
(transformers initialises it to 0) so that it changes the choice of experts too."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

import graphllm
from graphllm.errors import GraphllmError
from graphllm.generate import StaticGenerator
from graphllm.models import ModelConfig, load_model, save_hf
from graphllm.models.decoder import IGNORE_INDEX

from hf_parity import FAMILIES, FP32_PARITY_RTOL, batch, hf_model, rel_err

FAMILY = "deepseek-v3"
# AdamW's first step moves each weight by lr·g/(|g| + eps), about lr·sign(g): a gradient element near 0 that fp32
# reduction order shifts (gradients agree to ≤ 1e-6 relative per tensor here) still moves its weight by a visible
# part of lr. Measured on this config, logits after the step: 4e-5 (lr 1e-2, eps 1e-8), 1.4e-5 (1e-2, 1e-6),
# 1.8e-6 (1e-3, 1e-6). So eps 1e-6 keeps the step a smooth function of the gradient, and lr 1e-3 still moves the
# logits by far more than the tolerance (checked below).
ADAMW_LR, ADAMW_EPS = 1e-3, 1e-6
BIAS_STD = 0.05  # e_score_correction_bias spread: the size of the sigmoid scores' gaps, so it reorders some experts


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """transformers' model (routing bias drawn) and its save_pretrained directory; tests copy the model."""
    hf = hf_model(FAMILY, "sdpa")
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in hf.model.layers[hf.config.first_k_dense_replace:]:
            bias = layer.mlp.gate.e_score_correction_bias
            bias.copy_(torch.randn(bias.shape, generator=gen) * BIAS_STD)
    ckpt = tmp_path_factory.mktemp("deepseek") / "ckpt"
    hf.save_pretrained(ckpt)
    return hf, ckpt


def _deepseek(**kw) -> dict:
    """The test family's config.json dict as transformers writes it, with `kw` changed."""
    return {**FAMILIES[FAMILY][0](**FAMILIES[FAMILY][2]).to_dict(), **kw}


def _aligned(ids: torch.Tensor) -> torch.Tensor:
    """graphllm's labels for transformers' `labels=ids` (HF shifts them itself and drops the last position)."""
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)], dim=1)


def test_router_matches_transformers_and_groups_matter(pair) -> None:
    """route() picks transformers' experts with its weights; plain top-k (no groups) or no bias would pick others."""
    hf, ckpt = pair
    ours = load_model(ckpt).model.layers[1].mlp
    theirs = hf.model.layers[1].mlp.gate
    x = torch.randn(64, hf.config.hidden_size, generator=torch.Generator().manual_seed(3))
    weights, ids, _ = ours.route(ours.router_logits(x), x.dtype)
    _, want_w, want_ids = theirs(x)
    order, want_order = ids.argsort(dim=-1), want_ids.argsort(dim=-1)
    assert torch.equal(ids.gather(1, order), want_ids.gather(1, want_order))
    assert rel_err(weights.gather(1, order), want_w.gather(1, want_order)) <= FP32_PARITY_RTOL
    scores = torch.sigmoid(x @ ours.gate.weight.T)
    plain = (scores + ours.gate.e_score_correction_bias).topk(2, dim=-1)[1].sort(dim=-1)[0]  # [T, k] no groups
    grouped = ids.sort(dim=-1)[0]
    assert (plain != grouped).any(dim=-1).sum() >= 4, "group-limited routing must change some tokens' experts"
    unbiased = scores.topk(2, dim=-1)[1].sort(dim=-1)[0]
    assert (unbiased != plain).any(dim=-1).sum() >= 4, "the routing bias must change some tokens' experts"


def test_loss_and_adamw_step_match_transformers(pair, request) -> None:
    """The captured training graph's loss (no aux loss: transformers' DeepseekV3 has none), its gradients, one
    AdamW step on both models from them, and the logits before and after."""
    repro = f"reproduce: python -m pytest tests/test_deepseek_v3.py -k '{request.node.name}'"
    hf = copy.deepcopy(pair[0])
    ours = load_model(pair[1])
    ids, _ = batch()
    labels = _aligned(ids)
    compiled = graphllm.compile(ours, ids, labels, backend="eager")
    theirs = hf(input_ids=ids, labels=ids)
    loss = compiled(ids, labels)
    err = rel_err(loss.detach(), theirs.loss.detach())
    assert err <= FP32_PARITY_RTOL, f"loss rel err {err:.2e}; {repro}"
    with torch.no_grad():
        before = ours(ids)
    assert rel_err(before, theirs.logits) <= FP32_PARITY_RTOL, f"logits; {repro}"

    theirs.loss.backward()
    loss.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        want = hf_params[name].grad
        assert p.grad is not None and rel_err(p.grad, want) <= FP32_PARITY_RTOL, f"gradient of {name}; {repro}"
    assert ours.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0, "the router got no gradient"
    for m in (hf, ours):
        torch.optim.AdamW(m.parameters(), lr=ADAMW_LR, eps=ADAMW_EPS).step()
    with torch.no_grad():
        after = ours(ids)
        err_step = rel_err(after, hf(input_ids=ids).logits)
    assert err_step <= FP32_PARITY_RTOL, f"logits after one AdamW step rel err {err_step:.2e}; {repro}"
    assert rel_err(after, before) > 100 * FP32_PARITY_RTOL, "the step must move the logits well past the tolerance"
    assert torch.equal(ours.model.layers[1].mlp.gate.e_score_correction_bias,
                       hf.model.layers[1].mlp.gate.e_score_correction_bias), "the routing bias is no parameter"


@pytest.mark.slow
def test_inductor_logits_and_loss_match_transformers(pair, request) -> None:
    """The inductor backend on the forward graph (an inference graph: a cold fwd+bwd inductor compile of this
    model takes ~50 s on a loaded 2-core CI machine, the forward ~18 s; the backward is checked eagerly above)."""
    repro = f"reproduce: python -m pytest tests/test_deepseek_v3.py -k '{request.node.name}'"
    hf, ckpt = pair
    ours = load_model(ckpt)
    ids, _ = batch()
    compiled = graphllm.compile(ours, ids, backend="inductor", purpose="eval")
    with torch.no_grad():
        logits = compiled(ids)
        theirs = hf(input_ids=ids, labels=ids)
    err = rel_err(logits, theirs.logits)
    assert err <= FP32_PARITY_RTOL, f"inductor logits rel err {err:.2e}; {repro}"
    loss = F.cross_entropy(logits.flatten(0, 1), _aligned(ids).flatten(), ignore_index=IGNORE_INDEX)
    assert rel_err(loss, theirs.loss) <= FP32_PARITY_RTOL, f"loss from inductor logits; {repro}"


def test_routed_experts_go_through_dispatch_without_a_loop() -> None:
    """The MoE layer is SparseMoeBlock.dispatch's graph (moe_permute → 2 grouped matmuls → moe_unpermute) whatever
    the expert count: expert parallelism rewrites it as it does Mixtral's."""
    ids, _ = batch()
    counts = {}
    for experts in (8, 16):
        cfg = ModelConfig.from_hf(_deepseek(n_routed_experts=experts), source=FAMILY)
        graph = torch.export.export(graphllm.models.build_model(cfg, seed=1), (ids,), strict=False).graph
        targets = [str(n.target) for n in graph.nodes if n.op == "call_function"]
        counts[experts] = (len(targets), *(targets.count(f"graphllm.{op}.default")
                                           for op in ("moe_permute", "grouped_matmul", "moe_unpermute")))
    assert counts[8] == counts[16] and counts[8][1:] == (1, 2, 1), counts  # one MoE layer (layer 0 is dense)


def test_dense_q_projection_without_interleave_or_yarn(tmp_path: Path) -> None:
    """q_lora_rank None (one q_proj), rotate_half RoPE without YaRN: logits equal transformers', eager attention."""
    kwargs = dict(FAMILIES[FAMILY][2], q_lora_rank=None, rope_interleave=False, rope_scaling=None)
    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(**kwargs)
    cfg._attn_implementation = "eager"
    hf = transformers.DeepseekV3ForCausalLM(cfg).float()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf.save_pretrained(tmp_path / "ckpt")
    ours = load_model(tmp_path / "ckpt", attn_implementation="eager")
    assert ours.config.q_lora_rank is None and not ours.config.rope_interleaved
    ids, _ = batch()
    with torch.no_grad():
        assert rel_err(ours(ids), hf(input_ids=ids).logits) <= FP32_PARITY_RTOL


def test_greedy_generation_over_the_latent_cache_equals_transformers(pair) -> None:
    from test_generate import MAX_LEN, NEW, PROMPTS, hf_greedy, ours as generate

    hf, ckpt = pair
    model = load_model(ckpt)
    gen = StaticGenerator(model, batch_size=3, max_len=MAX_LEN, backend="eager")
    cfg = model.config
    latent = (cfg.num_hidden_layers, 3, 1, MAX_LEN)  # one latent "head": kv_lora_rank + qk_rope_head_dim per token
    assert gen.k_cache.shape == (*latent, cfg.kv_lora_rank) and gen.v_cache.shape == (*latent, cfg.head_dim)
    assert generate(gen, PROMPTS, NEW) == hf_greedy(copy.deepcopy(hf).eval(), PROMPTS, NEW)


def test_config_round_trips_through_transformers(pair) -> None:
    hf, _ = pair
    cfg = ModelConfig.from_hf(hf.config.to_dict(), source=FAMILY)
    assert ModelConfig.from_hf(cfg.to_hf(), source="written") == cfg
    reloaded = transformers.DeepseekV3Config.from_dict(cfg.to_hf())  # transformers reads what graphllm writes
    assert ModelConfig.from_hf(reloaded.to_dict(), source="reloaded") == cfg
    assert (cfg.n_group, cfg.topk_group, cfg.n_shared_experts, cfg.routed_scaling_factor) == (4, 2, 1, 2.5)
    assert (cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.head_dim, cfg.v_head_dim) == (24, 16, 8, 8, 12)
    assert [cfg.is_moe_layer(i) for i in range(2)] == [False, True] and cfg.rope_interleaved
    attn = hf.model.layers[0].self_attn
    assert cfg.attention_scale == attn.scaling != cfg.qk_head_dim**-0.5  # YaRN's mscale_all_dim applied
    assert cfg.rope_scaling["attention_factor"] == hf.model.rotary_emb.attention_scaling != 1.0  # mscale 0.707 ≠ 1


def test_weights_round_trip_bit_for_bit(pair, tmp_path: Path) -> None:
    """transformers' files → graphllm (stacked experts, routing bias buffer) → save_hf: the same tensors."""
    _, ckpt = pair
    model = load_model(ckpt)
    assert model.model.layers[1].mlp.experts.gate_up_proj.shape == (8, 64, 64)  # [E, 2I, H]
    out = save_hf(model, model.config, tmp_path / "out")
    theirs, ours = load_file(str(ckpt / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for k, t in theirs.items():
        assert ours[k].dtype == t.dtype and torch.equal(ours[k], t), k
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 0
    bf16 = load_model(ckpt, dtype=torch.bfloat16)  # the routing bias keeps its float32 values
    assert torch.equal(bf16.model.layers[1].mlp.gate.e_score_correction_bias,
                       theirs["model.layers.1.mlp.gate.e_score_correction_bias"])


@pytest.mark.parametrize("d,message", [
    (_deepseek(scoring_func="softmax"), r"scoring_func='softmax' in cfg.json is not supported; .*'sigmoid' only"),
    (_deepseek(topk_method="greedy"), r"topk_method='greedy' in cfg.json is not supported; .*'noaux_tc' only"),
    (_deepseek(n_group=3), r"cfg.json: n_group=3 must split num_experts=8 into equal groups"),
    (_deepseek(topk_group=5), r"cfg.json: topk_group=5 exceeds n_group=4"),
    (_deepseek(num_experts_per_tok=5), r"cfg.json: num_experts_per_tok=5 exceeds the 4 experts of topk_group=2"),
    (_deepseek(num_key_value_heads=2), r"cfg.json: num_key_value_heads=2 is not supported for deepseek_v3"),
    (_deepseek(kv_lora_rank=0), r"cfg.json: kv_lora_rank must be a positive integer for deepseek_v3, got 0"),
    (_deepseek(output_router_logits=True, first_k_dense_replace=5),
     r"cfg.json: first_k_dense_replace=5 must be in \[0, num_hidden_layers=2\]"),
    ({**FAMILIES["llama"][2], "model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 2.0}},
     r"cfg.json: rope_type 'yarn' is not supported; supported: default, linear, llama3, longrope$"),
    ({**FAMILIES["mixtral"][2], "model_type": "mixtral", "n_group": 2}, r"n_group=2 in cfg.json is not supported"),
])
def test_unsupported_fields_are_refused_by_name(d: dict, message: str) -> None:
    with pytest.raises(GraphllmError, match=message):
        ModelConfig.from_hf(d, source="cfg.json")
