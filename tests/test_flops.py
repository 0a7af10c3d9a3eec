"""graphllm.planning.flops on a mixture-of-experts graph: the router and both grouped matmuls, whose rows are the
T·k token-expert pairs (not the T tokens), counted by hand against the captured model graph."""

from __future__ import annotations

import torch

import graphllm
from graphllm.models import ModelConfig, build_model
from graphllm.planning.flops import forward_flops, node_flops, train_step_flops

B, S = 2, 8


def _moe_graph():
    cfg = ModelConfig(model_type="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=3,
                      moe_intermediate_size=24, output_router_logits=True)
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(0))
    compiled = graphllm.compile(build_model(cfg, seed=0), ids, ids, backend="eager")
    return cfg, compiled.result.model_graph


def test_moe_flops_count_router_and_grouped_matmuls_over_t_times_k_rows() -> None:
    cfg, gm = _moe_graph()
    T, H, E, k, inter = B * S, cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.expert_size
    layers, gl = cfg.num_hidden_layers, torch.ops.graphllm
    gmm = [node_flops(n) for n in gm.graph.nodes if n.op == "call_function" and n.target is gl.grouped_matmul.default]
    assert sorted(gmm) == sorted([2 * T * k * H * 2 * inter, 2 * T * k * inter * H] * layers), gmm
    router = [node_flops(n) for n in gm.graph.nodes if n.op == "call_function"
              and n.target is torch.ops.aten.linear.default and tuple(n.args[1].meta["val"].shape) == (E, H)]
    assert router == [2 * T * H * E] * layers, router

    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    attention = 2 * T * H * (q + 2 * kv) + 2 * T * q * H + 2 * 2 * B * cfg.num_attention_heads * S * S * cfg.head_dim
    moe = 2 * T * H * E + 2 * T * k * (H * 2 * inter + inter * H)
    expected = layers * (attention + moe) + 2 * T * H * cfg.vocab_size  # + the LM head
    assert forward_flops(gm) == expected
    assert train_step_flops(gm) == 3 * expected  # backward: dx is a grouped matmul, dW the weight-grad op, same size
