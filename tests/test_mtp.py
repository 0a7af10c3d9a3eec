"""Multi-token prediction (--mtp-layers, DeepSeek-V3's MTP): the loss against transformers' own modules, the
weights between DeepSeek's file layout and graphllm's, and the plan's refusals. (Training under --ep:
tests/test_expert_parallel.py.)

The reference builds each MTP module from transformers' DeepseekV3DecoderLayer and RMSNorm, given graphllm's
weights, on top of transformers' DeepseekV3ForCausalLM: DeepSeek-V3 §2.2's formula written out in the test.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from hf_parity import BATCH, SEQ, VOCAB, hf_model, rel_err, save_hf_checkpoint

DEPTHS = 2
WEIGHT = 0.3
RTOL = 1e-5
"""fp32: the same ops on the same weights; transformers' and graphllm's kernels sum in other orders."""


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    hf = hf_model("deepseek-v3", "sdpa")
    return hf, save_hf_checkpoint(hf, "deepseek-v3", tmp_path_factory.mktemp("ds") / "ckpt")


def _ahead(t: torch.Tensor, d: int, fill: int) -> torch.Tensor:
    return torch.cat([t[:, d:], torch.full_like(t[:, :d], fill)], dim=1)


def _reference(hf, ours, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mean MTP cross-entropy) from transformers' modules with `ours`' MTP weights."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

    cfg = hf.config
    L, H = cfg.num_hidden_layers, cfg.hidden_size
    h = hf.model(ids).last_hidden_state  # normed: what the LM head reads
    pos = torch.arange(ids.shape[1])[None]
    rope = hf.model.rotary_emb(h, pos)
    ce = []
    for d in range(1, DEPTHS + 1):
        mine = {k: v for k, v in ours.model.mtp[d - 1].state_dict().items()}
        layer = DeepseekV3DecoderLayer(cfg, L + d - 1).float()
        layer.load_state_dict({k: v for k, v in mine.items() if k.split(".")[0] in
                               ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")})
        enorm, hnorm, head_norm = (DeepseekV3RMSNorm(H, cfg.rms_norm_eps) for _ in range(3))
        enorm.weight.data, hnorm.weight.data = mine["enorm.weight"], mine["hnorm.weight"]
        head_norm.weight.data = mine["shared_head.norm.weight"]
        x = F.linear(torch.cat([enorm(hf.model.embed_tokens(_ahead(ids, d, 0))), hnorm(h)], -1),
                     mine["eh_proj.weight"])
        h = layer(x, attention_mask=None, position_ids=pos, position_embeddings=rope)
        logits = hf.lm_head(head_norm(h)).float()
        ce.append(F.cross_entropy(logits.flatten(0, 1), _ahead(labels, d, -100).flatten(), ignore_index=-100))
    main = F.cross_entropy(hf.lm_head(hf.model(ids).last_hidden_state).float().flatten(0, 1), labels.flatten())
    mtp = torch.stack(ce).mean()
    return main + WEIGHT * mtp, mtp


def test_mtp_loss_and_gradients_equal_transformers_modules(deepseek, caplog):
    """graphllm's DeepSeek-V3 with 2 MTP modules (drawn: transformers' files hold none) against the formula on
    transformers' modules: the training loss, the MTP metric and the gradients of the MTP and shared weights."""
    from graphllm.models import load_model

    hf, ckpt = deepseek
    with caplog.at_level(logging.WARNING):
        ours = load_model(ckpt, mtp_layers=DEPTHS, seed=3)
    assert "no weights for multi-token prediction module 1" in caplog.text
    ours.mtp_loss_weight = WEIGHT
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = _ahead(ids, 1, -100)
    loss, metrics = ours(ids, labels)
    want_loss, want_mtp = _reference(hf, ours, ids, labels)
    assert abs(loss.item() - want_loss.item()) <= RTOL * want_loss.item()
    assert abs(metrics.item() - want_mtp.item()) <= RTOL * want_mtp.item()
    assert ours(ids).shape == (BATCH, SEQ, VOCAB)  # without labels: the main model's logits only
    loss.backward()
    want_loss.backward()
    mine = dict(ours.named_parameters())
    theirs = dict(hf.named_parameters())
    assert rel_err(mine["model.embed_tokens.weight"].grad, theirs["model.embed_tokens.weight"].grad) <= 1e-4
    assert rel_err(mine["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"].grad,
                   theirs["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"].grad) <= 1e-4
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in mine.items()
               if n.startswith("model.mtp.") and "experts" not in n and "gate.weight" not in n)


def test_mtp_weights_round_trip_through_deepseek_files(deepseek, tmp_path: Path):
    """graphllm-to-hf writes module d as model.layers.<L + d - 1>.* with num_nextn_predict_layers; loading it
    again gives the same modules (none drawn); it writes the release's copies of the embedding and head under
    each MTP layer, and loading drops them; without --mtp-layers the modules are dropped, as transformers does."""
    from graphllm.convert import graphllm_to_hf
    from graphllm.models import load_model
    from graphllm.parallel.checkpoint import save_checkpoint

    _, ckpt = deepseek
    ours = load_model(ckpt, mtp_layers=DEPTHS, seed=3)
    L = ours.config.num_hidden_layers
    meta = {"fingerprint": ours.config.fingerprint(), "config": ours.config.to_dict(), "kind": "weights"}
    save_checkpoint(tmp_path / "gl", step=0, named_params=dict(ours.state_dict()), optim_state=None, extra={},
                    meta=meta, st=None)
    graphllm_to_hf(tmp_path / "gl", tmp_path / "hf")
    files = {}
    for f in (tmp_path / "hf").glob("*.safetensors"):
        files.update(load_file(f))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_nextn_predict_layers"] == DEPTHS
    assert torch.equal(files[f"model.layers.{L + 1}.eh_proj.weight"], ours.model.mtp[1].eh_proj.weight)
    assert f"model.layers.{L}.mlp.experts.0.gate_proj.weight" in files and not any("mtp" in k for k in files)
    for d in range(DEPTHS):  # the release's layout: copies of the embedding and head under each MTP layer
        assert torch.equal(files[f"model.layers.{L + d}.embed_tokens.weight"], ours.model.embed_tokens.weight)
        assert torch.equal(files[f"model.layers.{L + d}.shared_head.head.weight"], ours.lm_head.weight)
    again = load_model(tmp_path / "hf", mtp_layers=DEPTHS)
    for name, t in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name
    plain = load_model(tmp_path / "hf")
    assert not any("mtp" in n for n in plain.state_dict())
    _hf_to_graphllm_keeps_mtp(tmp_path, files, L)


def _hf_to_graphllm_keeps_mtp(tmp_path: Path, files: dict[str, torch.Tensor], L: int) -> None:
    """`convert hf-to-graphllm --mtp-layers` keeps the modules (HF -> graphllm -> HF bitwise, the release's copies
    included); asking for more modules than the directory holds is one line, exit 2, nothing written."""
    from graphllm.cli.main import EXIT_USER_ERROR, main
    from graphllm.convert import graphllm_to_hf, hf_to_graphllm

    hf_to_graphllm(tmp_path / "hf", tmp_path / "gl2", mtp_layers=DEPTHS)
    graphllm_to_hf(tmp_path / "gl2", tmp_path / "hf2")
    back = {}
    for f in (tmp_path / "hf2").glob("*.safetensors"):
        back.update(load_file(f))
    assert set(back) == set(files)
    assert all(torch.equal(back[k], files[k]) for k in back)
    bad = tmp_path / "gl3"
    assert main(["convert", "hf-to-graphllm", "--hf", str(tmp_path / "hf"), "--out", str(bad),
                 "--mtp-layers", str(DEPTHS + 1)]) == EXIT_USER_ERROR
    assert not bad.exists()


def test_plan_refuses_what_mtp_does_not_compose_with(tmp_path: Path, capsys):
    from graphllm.cli.main import EXIT_USER_ERROR, main

    for extra, message in ((["--task", "dpo"], "--mtp-layers 1 with --task dpo"),
                           (["--mtp-loss-weight", "-1"], "--mtp-loss-weight")):
        out = tmp_path / "art"
        assert main(["compile", "--model", "tiny-llama", "--out", str(out), "--mtp-layers", "1", *extra]) == EXIT_USER_ERROR
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not out.exists()


def test_converted_checkpoint_loads_into_a_run_with_mtp_modules(deepseek, tmp_path: Path, caplog):
    """`run --load` of an hf-to-graphllm checkpoint (no MTP weights) with --mtp-layers: the model's weights load,
    the modules keep their drawn weights, and the run says so."""
    from types import SimpleNamespace

    from graphllm.convert import hf_to_graphllm
    from graphllm.models import load_model
    from graphllm.parallel.engine import persistent_buffers
    from graphllm.plan import CompilePlan
    from graphllm.resume import load_step

    hf, ckpt = deepseek
    hf_to_graphllm(ckpt, tmp_path / "gl")
    fresh = load_model(ckpt, mtp_layers=1, seed=5)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    drawn = {n: t.clone() for n, t in fresh.state_dict().items() if n.startswith("model.mtp.")}
    built = SimpleNamespace(model=fresh, plan=CompilePlan(model=str(ckpt)), rank=0,
                            engine=SimpleNamespace(named_params=dict(fresh.named_parameters()), st=None,
                                                   named_state=persistent_buffers(fresh)))
    with caplog.at_level(logging.WARNING):
        assert load_step(tmp_path / "gl", built, torch.optim.AdamW(fresh.parameters())) == 0
    assert "no weights for the multi-token prediction modules" in caplog.text
    mine = fresh.state_dict()
    assert all(torch.equal(mine[n], t) for n, t in drawn.items())
    assert torch.equal(mine["model.layers.1.mlp.experts.gate_up_proj"], hf.state_dict()["model.layers.1.mlp.experts.gate_up_proj"])


def test_mtp_at_pp2_trains_like_one_process(deepseek):
    """--mtp-layers 1 at pp2: the module runs on the last stage; the embedding of the tokens ahead is looked up on
    the first (the split places it with the embedding) and crosses as an activation. Losses, MTP losses and
    parameters equal one process's (micro-batches 2)."""
    from dist_util import run_ranks
    from test_expert_parallel import _check, train

    _, ckpt = deepseek
    reference = train(str(ckpt), {"micro_batches": 2}, mtp=1)
    results = run_ranks(train, 2, str(ckpt), {"pp": 2, "micro_batches": 2}, mtp=1)
    _check("mtp pp2", results, reference)
    for r in results:
        assert r["mtp"] == pytest.approx(reference["mtp"], rel=1e-5)
    assert "model.embed_tokens.weight" in results[0]["params"] and "model.mtp.0.eh_proj.weight" in results[1]["params"]


def test_mtp_at_tp2_with_sequence_parallel_trains_like_one_process():
    """--mtp-layers 1 at tp2 with sequence parallelism (tiny-llama): the module's layer is split like a decoder
    layer, its lookups of the tokens ahead and its LM head are vocab-parallel. Losses, MTP losses and parameters
    equal one process's."""
    from dist_util import run_ranks
    from test_expert_parallel import _check, train

    reference = train("tiny-llama", {}, mtp=1)
    results = run_ranks(train, 2, "tiny-llama", {"tp": 2, "sequence_parallel": True}, mtp=1)
    _check("mtp tp2 sp", results, reference)
    for r in results:
        assert r["mtp"] == pytest.approx(reference["mtp"], rel=1e-5)
    q = results[0]["params"]["model.mtp.0.self_attn.q_proj.weight"]
    assert q[1] is not None and q[1].count == 2, "the module's attention is not tensor-parallel"
