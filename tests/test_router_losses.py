"""The router losses the plan adds (--moe-z-loss-coeff, --moe-seq-aux-loss-coeff) against their formulas written
out here, on transformers' own router outputs (Mixtral's softmax router, DeepSeek-V3's grouped sigmoid router).
Training with them at ep2 and at pp2 × ep2: tests/test_expert_parallel.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_parity import BATCH, SEQ, VOCAB, hf_model, save_hf_checkpoint

Z, ALPHA = 0.1, 0.5
"""Large weights, so the added terms are far above the fp32 noise of the loss (about 1e-6 of 5)."""
RTOL = 1e-4
"""The added terms are a difference of two fp32 losses of ~5: their error is ~1e-6 absolute, on terms of ~0.5."""


def _router_outputs(family: str, hf, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per MoE layer: (logits [T, E], expert ids [T, k], normalised probabilities [T, E]) from transformers."""
    k = hf.config.num_experts_per_tok
    if family == "mixtral":
        logits = hf(ids, output_router_logits=True).router_logits
        return [(lg, F.softmax(lg.float(), -1).topk(k, -1)[1], F.softmax(lg.float(), -1)) for lg in logits]
    seen = []
    routers = [m for m in hf.modules() if type(m).__name__ == "DeepseekV3TopkRouter"]
    hooks = [r.register_forward_hook(lambda _m, _i, out: seen.append(out)) for r in routers]
    hf(ids)
    for h in hooks:
        h.remove()
    return [(lg, idx, lg.sigmoid() / lg.sigmoid().sum(-1, keepdim=True)) for lg, _, idx in seen]


def _formulas(outputs, E: int, k: int) -> tuple[float, float]:
    z = sum(torch.logsumexp(lg.float(), -1).pow(2).mean() for lg, _, _ in outputs)
    seq = 0.0
    for _, idx, p in outputs:
        for b in range(BATCH):
            rows = slice(b * SEQ, (b + 1) * SEQ)
            f = torch.bincount(idx[rows].flatten(), minlength=E).float() * E / (k * SEQ)
            seq += (f * p[rows].mean(0)).sum() / BATCH
    return float(z), float(seq)


@pytest.mark.parametrize("family", ["mixtral", "deepseek-v3"])
def test_router_losses_add_their_formulas(family: str, tmp_path):
    from graphllm.models import load_model

    hf = hf_model(family, "sdpa")
    ours = load_model(save_hf_checkpoint(hf, family, tmp_path / "ckpt"))
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(4))
    labels = torch.roll(ids, -1, 1)
    cfg = ours.config
    plain = ours(ids, labels).item()
    z, seq = _formulas(_router_outputs(family, hf, ids), cfg.num_experts, cfg.num_experts_per_tok)
    assert z > 0.1 and seq > 0.1
    ours.router_z_loss_coeff = Z
    with_z = ours(ids, labels).item()
    ours.seq_aux_loss_coeff = ALPHA
    both = ours(ids, labels).item()
    assert with_z - plain == pytest.approx(Z * z, rel=RTOL)
    assert both - with_z == pytest.approx(ALPHA * seq, rel=RTOL)

