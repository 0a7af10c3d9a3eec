"""`graphllm convert megatron-to-graphllm / graphllm-to-megatron`, checked against megatron-core itself on 4 gloo
ranks (tests/megatron_util.py, one run shared by the module): a GPTModel loads what graphllm writes (tp2 x pp2 and
tp1 x pp1) and gives graphllm's logits; checkpoints megatron-core saves at tp2 x pp2 (legacy, as Megatron-LM's
save_checkpoint writes them, and torch_dist, by megatron.core.dist_checkpointing.save) convert to graphllm with
megatron-core's logits; graphllm -> Megatron -> graphllm is bitwise; bad input is one line, exit 2, nothing written.

Reproduce: python -m pytest -q tests/test_megatron_convert.py
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from dist_util import run_ranks
from graphllm.cli.main import main
from graphllm.megatron_io import read_checkpoint
from graphllm.megatron_unpickle import load_pt
from graphllm.models import LlamaForCausalLM, ModelConfig, build_model, save_hf
from graphllm.parallel.checkpoint import MARKER, latest_checkpoint, load_checkpoint
from megatron_util import FP32_RTOL, rel_err, world

pytestmark = pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core is not installed")

VOCAB, PADDED, STATED_VOCAB = 128, 256, 250
"""graphllm models' vocabulary (tp=2 pads it to 256); the Megatron-native model's padded vocabulary and the
vocab_size its --hf-config states."""
IDS = torch.randint(0, 120, (2, 8), generator=torch.Generator().manual_seed(0))
MODELS = {  # name: (ModelConfig fields, tp, pp)
    "qwen2-tied": ({"model_type": "qwen2", "attention_bias": True, "tie_word_embeddings": True, "num_hidden_layers": 4},
                   2, 2),
    "llama": ({"model_type": "llama", "num_hidden_layers": 2, "rope_theta": 500000.0}, 1, 1),
}


def convert(*args) -> int:
    return main(["convert", *map(str, args)])


def tiny_config(**fields) -> ModelConfig:
    base = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5}
    return ModelConfig(**{**base, **fields})


def graphllm_model(root: Path) -> LlamaForCausalLM:
    """The model of a graphllm checkpoint (a root: its newest step), weights loaded, eval mode."""
    step = latest_checkpoint(root) or root
    model = LlamaForCausalLM(ModelConfig(**json.loads((step / MARKER).read_text())["config"]))
    load_checkpoint(step, named_params=dict(model.named_parameters()), want_optim=False, st=None,
                    expect_fingerprint=None)
    return model.eval()


def logits(root: Path) -> torch.Tensor:
    with torch.no_grad():
        return graphllm_model(root)(IDS)


def weights(root: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in graphllm_model(root).state_dict().items()}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    """Per MODELS entry: a random graphllm checkpoint (root) and its Megatron conversion (name + "-mg")."""
    base = tmp_path_factory.mktemp("megatron")
    out = {}
    for i, (name, (fields, tp, pp)) in enumerate(MODELS.items()):
        cfg = tiny_config(**fields)
        model = build_model(cfg, seed=i)
        with torch.no_grad():  # norms away from 1, so a misplaced norm shows
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        save_hf(model, cfg, base / f"{name}-hf")
        assert convert("hf-to-graphllm", "--hf", base / f"{name}-hf", "--out", base / name) == 0
        assert convert("graphllm-to-megatron", "--ckpt", base / name, "--out", base / f"{name}-mg", "--tp", tp,
                       "--pp", pp) == 0
        out[name], out[f"{name}-mg"] = base / name, base / f"{name}-mg"
    out["native"] = base / "native"
    return out


@pytest.fixture(scope="module")
def megatron(written) -> dict[str, torch.Tensor]:
    """Logits megatron-core computes (one 4-rank run): of graphllm's conversions and of its own saved model."""
    results = run_ranks(world, 4, IDS, str(written["qwen2-tied-mg"]), str(written["llama-mg"]), str(written["native"]))
    last_stage, first = results[2], results[0]  # ranks 2, 3: pipeline stage 1 (tp ranks 0, 1)
    return {"written_22": last_stage["written_22"], "native": last_stage["native"], "written_11": first["written_11"]}


@pytest.mark.parametrize("name,key", [("qwen2-tied", "written_22"), ("llama", "written_11")])
def test_megatron_core_loads_what_graphllm_writes(written, megatron, name, key):
    """GPTModel built from the written args takes the written state dict (strict) and agrees with graphllm."""
    ours = logits(written[name])
    assert rel_err(megatron[key][..., :VOCAB], ours) <= FP32_RTOL
    assert megatron[key].shape[-1] == (PADDED if name == "qwen2-tied" else VOCAB)


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
def test_megatron_core_checkpoints_convert(written, megatron, tmp_path, capsys, fmt):
    """A tp2 x pp2 checkpoint megatron-core saved converts; --hf-config trims the vocabulary padding (legacy),
    without it the padded vocabulary is kept (torch_dist)."""
    config = tmp_path / "config.json"
    hf = tiny_config(model_type="llama", num_hidden_layers=4, vocab_size=STATED_VOCAB).to_hf()
    config.write_text(json.dumps({**hf, "max_position_embeddings": 64}))
    stated = ["--hf-config", config] if fmt == "legacy" else []
    capsys.readouterr()
    assert convert("megatron-to-graphllm", "--megatron", written["native"] / fmt, "--out", tmp_path / "g", *stated) == 0
    said = capsys.readouterr().out
    vocab = STATED_VOCAB if fmt == "legacy" else PADDED
    assert rel_err(logits(tmp_path / "g"), megatron["native"][..., :vocab]) <= FP32_RTOL
    assert ("optimizer state was not converted" in said) == (fmt == "legacy")
    assert ("dropped Megatron's vocabulary padding" in said) == (fmt == "legacy")


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 4), (2, 2)])
def test_round_trip_is_bitwise(written, tmp_path, tp, pp):
    src = written["qwen2-tied"]
    assert convert("graphllm-to-megatron", "--ckpt", src, "--out", tmp_path / "mg", "--tp", tp, "--pp", pp) == 0
    assert convert("megatron-to-graphllm", "--megatron", tmp_path / "mg", "--out", tmp_path / "back") == 0
    want, got = weights(src), weights(tmp_path / "back")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    marker = lambda root: json.loads((latest_checkpoint(root) / MARKER).read_text())  # noqa: E731
    assert marker(tmp_path / "back")["fingerprint"] == marker(src)["fingerprint"]


def test_virtual_pipeline_and_transformer_engine_names(written, tmp_path):
    """Legacy files with virtual pipeline chunks ('model0', 'model1'), TE's fused norm names and TE extra state
    read as the plain layout: a pp=4 conversion regrouped as pp=2 x vp=2 (layers go chunk by chunk, stage by
    stage: pp=4 stage s is chunk s // 2 of stage s % 2)."""
    src = written["qwen2-tied"]
    assert convert("graphllm-to-megatron", "--ckpt", src, "--out", tmp_path / "pp4", "--pp", "4") == 0
    files = {}
    for s in range(4):
        state = load_pt(tmp_path / "pp4" / "release" / f"mp_rank_00_{s:03d}" / "model_optim_rng.pt", mmap=False)
        state["args"].pipeline_model_parallel_size, state["args"].virtual_pipeline_model_parallel_size = 2, 2
        model = {k.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
                  .replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"):
                 io.BytesIO(b"fp8 meta") if k.endswith("_extra_state") else v for k, v in state.pop("model").items()}
        files.setdefault(s % 2, state)[f"model{s // 2}"] = model
    for stage, state in files.items():
        (tmp_path / "vp" / "release" / f"mp_rank_00_{stage:03d}").mkdir(parents=True)
        torch.save(state, tmp_path / "vp" / "release" / f"mp_rank_00_{stage:03d}" / "model_optim_rng.pt")
    (tmp_path / "vp" / "latest_checkpointed_iteration.txt").write_text("release")
    assert convert("megatron-to-graphllm", "--megatron", tmp_path / "vp", "--out", tmp_path / "back") == 0
    want, got = weights(src), weights(tmp_path / "back")
    assert all(torch.equal(got[k], want[k]) for k in want)


class RunsCode:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_bad_input_one_line_exit_2_nothing_written(written, tmp_path, capsys):
    def refused(*args, match: str) -> None:
        capsys.readouterr()
        assert convert(*args) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and "\n" not in err, err
        assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    def copy(name: str) -> Path:
        return Path(shutil.copytree(written[name], tmp_path / name))

    mg = copy("qwen2-tied-mg")
    shutil.rmtree(mg / "release" / "mp_rank_01_001")
    refused("megatron-to-graphllm", "--megatron", mg, "--out", tmp_path / "out", match="mp_rank_01_001")
    shutil.rmtree(mg)

    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_config(model_type="qwen2", attention_bias=True, tie_word_embeddings=True,
                                             num_hidden_layers=2).to_hf()))
    refused("megatron-to-graphllm", "--megatron", written["qwen2-tied-mg"], "--out", tmp_path / "out", "--hf-config",
            config, match="num_hidden_layers=2")

    mg = copy("llama-mg")
    shard = mg / "release" / "mp_rank_00" / "model_optim_rng.pt"
    state = load_pt(shard, mmap=False)
    state["model"]["decoder.layers.0.self_attention.q_layernorm.weight"] = torch.ones(16)
    torch.save(state, shard)
    refused("megatron-to-graphllm", "--megatron", mg, "--out", tmp_path / "out",
            match="unknown state-dict key 'decoder.layers.0.self_attention.q_layernorm.weight'")
    del state["model"]["decoder.layers.0.self_attention.q_layernorm.weight"]
    state["args"].num_experts = 8
    torch.save(state, shard)
    refused("megatron-to-graphllm", "--megatron", mg, "--out", tmp_path / "out", match="args.num_experts=8")
    state["args"] = RunsCode(tmp_path / "ran")  # a pickle that would run code when loaded is not loaded
    torch.save(state, shard)
    refused("megatron-to-graphllm", "--megatron", mg, "--out", tmp_path / "out", match="cannot read")
    assert not (tmp_path / "ran").exists()

    refused("graphllm-to-megatron", "--ckpt", written["qwen2-tied"], "--out", tmp_path / "out", "--tp", "3",
            match="--tp must divide num_attention_heads=4, got 3")
    refused("graphllm-to-megatron", "--ckpt", written["qwen2-tied"], "--out", tmp_path / "out", "--pp", "3",
            match="--pp must divide num_hidden_layers=4, got 3")
    (tmp_path / "empty").mkdir()
    refused("megatron-to-graphllm", "--megatron", tmp_path / "empty", "--out", tmp_path / "out",
            match="is not a Megatron checkpoint")

    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    refused("graphllm-to-megatron", "--ckpt", written["llama"], "--out", user, match="exists and is not empty")
    assert convert("graphllm-to-megatron", "--ckpt", written["llama"], "--out", user, "--force") == 0
    assert sorted(p.name for p in user.iterdir()) == ["latest_checkpointed_iteration.txt", "notes.txt", "release"]
    assert read_checkpoint(user).args["num_layers"] == 2
