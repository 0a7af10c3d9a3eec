"""Mixture-of-experts families (Mixtral, Qwen3-MoE) against transformers, beyond the per-family logits,
compile and convert parity of hf_parity.FAMILIES: the training loss with the router's load-balancing loss
and the model after one AdamW step through the captured graph, the MoE block as one graph with no loop
over experts, greedy generation, and MoE config fields graphllm does not implement refused by name."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import graphllm
from graphllm.cli.main import EXIT_USER_ERROR, main
from graphllm.errors import GraphllmError
from graphllm.generate import StaticGenerator
from graphllm.models import ModelConfig, load_model
from graphllm.models.decoder import IGNORE_INDEX

from hf_parity import FAMILIES, FP32_PARITY_RTOL, MOE_FAMILIES, batch, hf_model, rel_err, save_hf_checkpoint

ADAMW_LR = 1e-2  # large enough that one step moves the routing of some tokens' logits visibly
BF16_GRAD_RTOL = 3e-2  # bf16 autocast, eager vs inductor: a few bf16 roundings (2^-8) fused in another order


def _pair(family: str, tmp_path: Path):
    hf = hf_model(family, "sdpa")
    return hf, load_model(save_hf_checkpoint(hf, family, tmp_path / "ckpt"))


def _aligned(ids: torch.Tensor) -> torch.Tensor:
    """graphllm's labels for transformers' `labels=ids` (HF shifts them itself and drops the last position)."""
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)], dim=1)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_loss_with_aux_loss_and_adamw_step_match_transformers(family: str, tmp_path: Path, request) -> None:
    """Training loss = cross-entropy + router_aux_loss_coef × load-balancing loss; then one AdamW step on both
    models from that loss, and the logits again."""
    repro = f"reproduce: python -m pytest tests/test_moe_models.py -k '{request.node.name}'"
    hf, ours = _pair(family, tmp_path)
    ids, _ = batch()
    labels = _aligned(ids)
    # Mixtral's loss through the captured training graph; Qwen3-MoE's through the module (saves a compile)
    compiled = graphllm.compile(ours, ids, labels, backend="eager") if family == "mixtral" else ours
    theirs = hf(input_ids=ids, labels=ids)
    assert theirs.aux_loss > 0.5, "the test config must route with an aux loss"  # ≈ k = 2 when balanced
    loss = compiled(ids, labels)
    err = rel_err(loss.detach(), theirs.loss.detach())
    assert err <= FP32_PARITY_RTOL, f"{family} loss incl. aux loss rel err {err:.2e}; {repro}"
    coef = hf.config.router_aux_loss_coef
    plain = torch.nn.functional.cross_entropy(ours(ids).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    assert rel_err(loss.detach() - plain.detach(), coef * theirs.aux_loss.detach()) <= 1e-4, "aux loss not added"

    opts = [torch.optim.AdamW(m.parameters(), lr=ADAMW_LR) for m in (hf, ours)]
    theirs.loss.backward()
    loss.backward()
    router = next(n for n, _ in ours.named_parameters() if n.endswith("mlp.gate.weight"))
    assert ours.get_parameter(router).grad.abs().sum() > 0, "the router got no gradient"
    for opt in opts:
        opt.step()
    with torch.no_grad():
        err_step = rel_err(ours(ids), hf(input_ids=ids).logits)
    assert err_step <= FP32_PARITY_RTOL, f"{family} logits after one AdamW step rel err {err_step:.2e}; {repro}"
    print(f"moe parity {family}: loss+aux {err:.2e}, logits after AdamW step {err_step:.2e}")


def _grouped_matmuls(model: torch.nn.Module, ids: torch.Tensor) -> tuple[int, int]:
    graph = torch.export.export(model, (ids,), strict=False).graph
    targets = [str(n.target) for n in graph.nodes if n.op == "call_function"]
    return targets.count("graphllm.grouped_matmul.default"), len(targets)


def test_experts_are_one_static_graph_without_a_loop(tmp_path: Path) -> None:
    """Two grouped matmuls per MoE layer whatever the expert count: the graph does not grow with experts."""
    ids, _ = batch()
    sizes = {}
    for experts in (4, 8):
        cfg = ModelConfig.from_hf({**FAMILIES["mixtral"][0](**FAMILIES["mixtral"][2]).to_dict(),
                                   "num_local_experts": experts}, source="mixtral")
        sizes[experts] = _grouped_matmuls(graphllm.models.build_model(cfg, seed=1), ids)
    assert sizes[4] == sizes[8] and sizes[4][0] == 2 * 2, sizes  # 2 layers × (gate_up, down)


def test_bf16_training_under_inductor_matches_the_eager_backend() -> None:
    """Mixed precision through inductor's C++ kernels: every gradient finite and within bf16 rounding of the eager
    backend's. The expert weights enter the grouped matmuls as stored (transpose_weight), so inductor makes no
    transposed bf16 copies of them; when it did, GCC 12.2 -O3 miscompiled the kernel that made them (two
    32×32 bf16 tile transposes in one function) and this gave NaN gradients (docs/moe.md)."""
    cfg = ModelConfig.from_hf(_mixtral(vocab_size=64, hidden_size=64, num_attention_heads=4, num_key_value_heads=2),
                              source="mixtral")
    model = graphllm.models.build_model(cfg, seed=1)
    gen = torch.Generator().manual_seed(0)
    ids, labels = (torch.randint(0, 64, (2, 32), generator=gen) for _ in range(2))
    grads = {}
    for backend in ("eager", "inductor"):
        replica = copy.deepcopy(model)
        graphllm.compile(replica, ids, labels, backend=backend, amp="bf16")(ids, labels).backward()
        grads[backend] = {name: p.grad for name, p in replica.named_parameters()}
    for name, want in grads["eager"].items():
        got = grads["inductor"][name]
        assert torch.isfinite(got).all(), f"{name}: non-finite gradient under inductor bf16"
        assert rel_err(got, want) <= BF16_GRAD_RTOL, f"{name}: rel err {rel_err(got, want):.2e}"


@pytest.mark.parametrize("family", ["qwen3-moe"])  # a dense and an MoE layer; Mixtral's block is the same code
def test_greedy_generation_equals_transformers(family: str, tmp_path: Path) -> None:
    from test_generate import MAX_LEN, NEW, PROMPTS, hf_greedy, ours

    hf, model = _pair(family, tmp_path)
    hf.config.output_router_logits = False  # transformers' aux loss breaks on padded decode steps; generation needs none
    gen = StaticGenerator(model, batch_size=3, max_len=MAX_LEN, backend="eager")
    assert ours(gen, PROMPTS, NEW) == hf_greedy(hf.eval(), PROMPTS, NEW), family


def _mixtral(**kw) -> dict:
    return {"model_type": "mixtral", "vocab_size": 16, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2, **kw}


@pytest.mark.parametrize("d,message", [
    (_mixtral(router_jitter_noise=0.1), r"router_jitter_noise=0.1 in cfg.json is not supported .* set 0.0"),
    (_mixtral(model_type="qwen3_moe", shared_expert_intermediate_size=64),
     r"shared_expert_intermediate_size=64 in cfg.json is not supported"),
    (_mixtral(scoring_func="sigmoid"), r"scoring_func 'sigmoid' in cfg.json is not supported; supported: softmax"),
    (_mixtral(num_experts_per_tok=5), r"cfg.json: num_experts_per_tok=5 exceeds num_experts=4"),
    (_mixtral(model_type="qwen3_moe", mlp_only_layers=[7]), r"cfg.json: mlp_only_layers names layer 7"),
    (_mixtral(model_type="qwen3", use_sliding_window=True), r"use_sliding_window=true in cfg.json is not supported"),
])
def test_unsupported_moe_fields_are_refused_by_name(d: dict, message: str) -> None:
    with pytest.raises(GraphllmError, match=message):
        ModelConfig.from_hf(d, source="cfg.json")


BAD_LAYOUTS = [  # flags → the one line that names the input and the fix
    (["--cp", "2", "--moe-capacity-factor", "1.0"], "--moe-capacity-factor 1 with --cp 2 is not supported yet"),
    (["--tp", "2", "--sequence-parallel", "--moe-capacity-factor", "1.0"],
     "--moe-capacity-factor 1 with --sequence-parallel is not supported yet"),
    (["--dp", "3", "--ep", "3"], "--ep 3 does not divide the model's 4 experts (num_experts)"),
    (["--ep", "2"], "--ep 2 must divide --dp 1"),
    (["--moe-capacity-factor", "0"], "--moe-capacity-factor 0.0 must be > 0"),
    (["--dp", "2", "--ep", "2", "--zero1"], "--ep with --zero1 is not supported yet"),
    (["--moe-bias-update-rate", "0.001"], "mixtral has no routing bias (e_score_correction_bias"),
    (["--tp", "2", "--etp", "4"], "--etp 4 must be 1 or --tp (2)"),
]


def test_cli_refuses_bad_moe_input(tmp_path: Path, capsys) -> None:
    """Each bad layout or option: one line, exit 2, nothing written; a dense model under --ep; router jitter."""
    hf = hf_model("mixtral", "sdpa")
    ckpt = save_hf_checkpoint(hf, "mixtral", tmp_path / "ckpt")
    flags = ["--model", str(ckpt), "--backend", "eager", "--batch-size", "1", "--seq-len", "16"]
    capsys.readouterr()  # transformers' save progress bar
    cases = [*BAD_LAYOUTS, (["--model", "tiny-llama", "--dp", "2", "--ep", "2"], "but llama is dense; use --ep 1"),
             (["--model", "tiny-llama", "--moe-z-loss-coeff", "0.001"], "llama is dense (no router to balance)"),
             (["--model", "tiny-llama", "--tp", "2", "--etp", "2"], "but llama is dense; use --etp 1")]
    for i, (extra, message) in enumerate(cases):
        assert main(["compile", "--out", str(tmp_path / f"bad{i}"), *flags, *extra]) == EXIT_USER_ERROR, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not (tmp_path / f"bad{i}").exists()
    jitter = tmp_path / "jitter"
    hf.config.router_jitter_noise = 0.5
    save_hf_checkpoint(hf, "mixtral", jitter)
    capsys.readouterr()
    assert main(["compile", "--out", str(tmp_path / "j"), *flags[2:], "--model", str(jitter)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "router_jitter_noise=0.5" in err[0] and not (tmp_path / "j").exists()


def test_etp_must_divide_the_expert_width() -> None:
    from types import SimpleNamespace

    from graphllm.planning import Layout

    cfg = SimpleNamespace(model_type="qwen3_moe", num_experts=8, expert_size=30, num_attention_heads=4,
                          intermediate_size=64, vocab_size=128, num_key_value_heads=4, num_hidden_layers=2)
    with pytest.raises(GraphllmError, match=r"--etp 4 does not divide the experts' MLP width 30 \(moe_intermediate"):
        Layout(tp=4, etp=4).check_model(cfg, batch_size=1, seq_len=16)
    Layout(tp=2, etp=2).check_model(cfg, batch_size=1, seq_len=16)


@pytest.mark.parametrize("family", ["qwen3", *MOE_FAMILIES])
def test_config_round_trips_through_transformers(family: str) -> None:
    hf = hf_model(family, "eager")
    cfg = ModelConfig.from_hf(hf.config.to_dict(), source=family)
    assert ModelConfig.from_hf(cfg.to_hf(), source="written") == cfg
    reloaded = FAMILIES[family][0].from_dict(cfg.to_hf())  # transformers reads what graphllm writes
    assert ModelConfig.from_hf(reloaded.to_dict(), source="reloaded") == cfg
    assert cfg.qk_norm == family.startswith("qwen3")
    if family in MOE_FAMILIES:
        assert cfg.output_router_logits and cfg.router_aux_loss_coef == 0.02
        assert [cfg.is_moe_layer(i) for i in range(2)] == [True, family == "mixtral"]  # qwen3-moe: layer 1 dense


def test_stacked_expert_names_load_too(tmp_path: Path) -> None:
    """A checkpoint holding transformers' in-memory names (3D experts, Mixtral's router under mlp.) loads as well."""
    from safetensors.torch import save_file

    hf = hf_model("mixtral", "sdpa")
    ckpt = save_hf_checkpoint(hf, "mixtral", tmp_path / "ckpt")
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in sd
    save_file(sd, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    ours = load_model(ckpt)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, sd[k]), k
