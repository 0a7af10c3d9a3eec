"""graphllm.compile against transformers: logits, then logits again after one optimizer step taken
through the compiled graph's gradients, for every family, on the eager and inductor backends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import graphllm
from hf_parity import (FAMILIES, FP32_PARITY_RTOL, VOCAB, batch, hf_model, parity_through_step, rel_err,
                       save_hf_checkpoint)

BACKENDS = ["eager", pytest.param("inductor", marks=pytest.mark.slow)]
# inductor for the llama family and the two forms furthest from it (Gemma 2: unit-offset norms, GeGLU,
# soft-capping, windows; GLM-4: interleaved partial RoPE, sandwich norms); ~30 s saved on the others
INDUCTOR_FAMILIES = ("llama", "llama-bias-rope-llama3", "qwen2-tied", "mistral-gqa-headdim", "gemma2", "glm4")
CASES = [(f, "eager") for f in FAMILIES] + [pytest.param(f, "inductor", marks=pytest.mark.slow)
                                             for f in FAMILIES if f in INDUCTOR_FAMILIES]


@pytest.mark.parametrize("family,backend", CASES)
def test_compiled_matches_transformers(family: str, backend: str, tmp_path: Path, request) -> None:
    repro = f"reproduce: python -m pytest tests/test_compile_parity.py -k '{request.node.name}'"
    hf = hf_model(family, "sdpa")
    ours = graphllm.load_model(save_hf_checkpoint(hf, family, tmp_path / "ckpt"))
    ids, targets = batch()
    compiled = graphllm.compile(ours, ids, backend=backend)
    err, err_step = parity_through_step(hf, ours, compiled, ids, targets)
    assert err <= FP32_PARITY_RTOL, f"{family}/{backend} logits rel err {err:.2e}; {repro}"
    assert err_step <= FP32_PARITY_RTOL, f"{family}/{backend} logits after one SGD step rel err {err_step:.2e}; {repro}"
    assert compiled.compile_counts["forward"] == 1 and compiled.compile_counts["backward"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_in_graph_matches_transformers_loss(backend: str, tmp_path: Path) -> None:
    """With labels the captured graph ends in the loss; it equals HF's shifted-label loss."""
    hf = hf_model("llama", "sdpa")
    ours = graphllm.load_model(save_hf_checkpoint(hf, "llama", tmp_path / "ckpt"))
    ids, targets = batch()
    compiled = graphllm.compile(ours, ids, targets, backend=backend)
    loss = compiled(ids, targets)
    full = torch.cat([ids, targets[:, -1:]], dim=1)  # HF shifts labels itself
    hf_loss = hf(input_ids=full[:, :-1], labels=full[:, :-1]).loss  # same tokens, HF drops the last label
    ref = F.cross_entropy(hf(input_ids=ids).logits.float().reshape(-1, VOCAB), targets.reshape(-1))
    assert rel_err(loss.detach(), ref.detach()) <= FP32_PARITY_RTOL
    assert torch.isfinite(hf_loss)
    loss.backward()
    assert all(p.grad is not None for p in ours.parameters())


def test_compiled_rejects_other_shapes() -> None:
    model = graphllm.load_model("tiny-llama")
    compiled = graphllm.compile(model, torch.zeros(2, 16, dtype=torch.long), backend="eager")
    with pytest.raises(graphllm.GraphllmError, match=r"compiled for \[2, 16\]"):
        compiled(torch.zeros(2, 8, dtype=torch.long))


def test_bf16_autocast_trains_close_to_fp32() -> None:
    """bf16 autocast on the compiled graph: loss within bf16 rounding of the fp32 loss."""
    model = graphllm.load_model("tiny-llama")
    ids, targets = batch()
    fp32 = graphllm.compile(model, ids, targets, backend="eager")(ids, targets)
    bf16 = graphllm.compile(model, ids, targets, backend="eager", amp="bf16")(ids, targets)
    BF16_LOSS_RTOL = 2e-2  # bf16 has 8 mantissa bits: ~4e-3 per op, accumulated over a few layers
    assert rel_err(bf16.detach(), fp32.detach()) <= BF16_LOSS_RTOL
    bf16.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_npu_backend_without_torch_npu_is_a_clear_error() -> None:
    model = graphllm.load_model("tiny-llama")
    with pytest.raises(graphllm.GraphllmError, match="torch_npu"):
        graphllm.compile(model, torch.zeros(1, 8, dtype=torch.long), backend="npu")


def test_unknown_backend() -> None:
    model = graphllm.load_model("tiny-llama")
    with pytest.raises(graphllm.GraphllmError, match="unknown backend 'tvm'"):
        graphllm.compile(model, torch.zeros(1, 8, dtype=torch.long), backend="tvm")
