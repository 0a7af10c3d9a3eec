"""Tensor-parallel generation on 2 gloo ranks: greedy ids equal the single-process generator's, each
rank's cache holds its kv heads only, the decode graph is compiled once and carries the collectives."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from dist_util import run_ranks
from graphllm.models import load_model
from hf_parity import hf_model, save_hf_checkpoint
from test_generate import MAX_LEN, MORE_PROMPTS, NEW, PROMPTS, ours

from graphllm.errors import GraphllmError
from graphllm.generate import StaticGenerator

TP = 2
BATCH = 3


def _checkpoint(family: str, root: Path) -> str:
    return str(save_hf_checkpoint(hf_model(family, "sdpa").eval(), family, root / family))


def tp_rank(path: str) -> dict:
    """One rank: generate both prompt batches with tp=2, report ids, cache shape, counts, graph text."""
    model = load_model(path)
    gen = StaticGenerator(model, batch_size=BATCH, max_len=MAX_LEN, backend="eager", tp=TP)
    ids = [ours(gen, PROMPTS, NEW), ours(gen, MORE_PROMPTS, NEW)]
    decode = gen.decode_graph().fn.result
    return {"ids": ids, "cache": tuple(gen.k_cache.shape), "counts": gen.compile_counts,
            "decode_code": decode.model_graph.code, "records": {r.name: dict(r.counters) for r in decode.records},
            "full_q": tuple(model.model.layers[0].self_attn.q_proj.weight.shape)}


# kv heads 2 (split) and 1 (replicated); Gemma 2 (windows, soft-capping, unit-offset norms) and Phi-3
# (fused qkv/gate_up checkpoint weights split on load, then sharded as llama's)
@pytest.mark.parametrize("family", ["llama", "mistral-gqa-headdim", "gemma2", "phi3-window"])
def test_tp2_greedy_ids_equal_one_process(family: str, tmp_path: Path) -> None:
    path = _checkpoint(family, tmp_path)
    ref_gen = StaticGenerator(load_model(path), batch_size=BATCH, max_len=MAX_LEN, backend="eager")
    want = [ours(ref_gen, PROMPTS, NEW), ours(ref_gen, MORE_PROMPTS, NEW)]
    outs = run_ranks(tp_rank, TP, path)
    cfg = ref_gen.config
    for rank, out in enumerate(outs):
        assert out["ids"] == want, f"rank {rank}"
        # this rank's kv heads only: half of them, or the one its query heads share
        kv = max(cfg.num_key_value_heads // TP, 1)
        assert out["cache"] == (cfg.num_hidden_layers, BATCH, kv, MAX_LEN, cfg.head_dim)
        assert out["counts"] == {"prefill[32]": 1, "decode": 1}
        # the user's model keeps its full weights; the graphs hold the shards
        assert out["full_q"] == (cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size)
        code = out["decode_code"]
        layers = cfg.num_hidden_layers
        # o_proj and down_proj all-reduced per layer, plus the vocab-parallel embedding; logits gathered
        assert code.count("graphllm.tp_reduce.default(") == 2 * layers + 1
        assert code.count("graphllm.tp_gather.default(") == 1
        assert out["records"]["tp_cache_inputs"]["resized inputs"] == 2
        assert out["records"]["tensor_parallel"]["sharded parameters"] > 0


def _mla_rank(path: str) -> dict:
    model = load_model(path)
    gen = StaticGenerator(model, batch_size=BATCH, max_len=MAX_LEN, backend="eager", tp=TP)
    ids = [ours(gen, PROMPTS, NEW), ours(gen, MORE_PROMPTS, NEW)]
    decode = gen.decode_graph().fn.result
    kv_b = {tuple(p.shape) for n, p in decode.model_graph.named_parameters() if n.endswith("kv_b_proj.weight")}
    return {"ids": ids, "cache": tuple(gen.k_cache.shape), "kv_b": kv_b, "code": decode.model_graph.code}


def test_tp2_multi_latent_attention_greedy_ids_equal_one_process(tmp_path: Path) -> None:
    """DeepSeek-V3 at tp2: each rank holds half the heads of q_b_proj and kv_b_proj (whose decode reads it absorbed,
    viewed by head) and the whole latent cache [L, B, 1, M, r] (the latent is shared by every head); greedy ids
    equal the single-process generator's."""
    path = _checkpoint("deepseek-v3", tmp_path)
    ref = StaticGenerator(load_model(path), batch_size=BATCH, max_len=MAX_LEN, backend="eager")
    want = [ours(ref, PROMPTS, NEW), ours(ref, MORE_PROMPTS, NEW)]
    cfg = ref.config
    full_rows = cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    for rank, out in enumerate(run_ranks(_mla_rank, TP, path)):
        assert out["ids"] == want, f"rank {rank}"
        assert out["cache"] == tuple(ref.k_cache.shape)
        assert out["kv_b"] == {(full_rows // TP, cfg.kv_lora_rank)}, out["kv_b"]
        assert out["code"].count("graphllm.tp_reduce.default(") >= cfg.num_hidden_layers


def test_tp_outside_launched_ranks_is_refused(tmp_path: Path) -> None:
    model = load_model(_checkpoint("llama", tmp_path))
    with pytest.raises(GraphllmError, match="--tp 2 needs 2 processes"):
        StaticGenerator(model, batch_size=1, max_len=MAX_LEN, backend="eager", tp=2)
    with pytest.raises(GraphllmError, match="does not divide the model's attention heads"):
        StaticGenerator(model, batch_size=1, max_len=MAX_LEN, backend="eager", tp=3)


def test_generate_command_refuses_a_tp_that_does_not_split_the_model(capsys) -> None:
    from graphllm.cli.main import EXIT_USER_ERROR, main

    # checked before any rank is launched: tiny-llama's heads do not split 3 ways
    assert main(["generate", "--model", "tiny-llama", "--prompt", "hi", "--backend", "eager", "--tp", "3"]) == EXIT_USER_ERROR
    assert "--tp 3 does not divide" in capsys.readouterr().err
