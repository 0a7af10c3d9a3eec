"""LoRA adapters between graphllm and the ecosystem: PEFT loads graphllm's adapters, graphllm loads PEFT's, and
merge-lora equals PEFT's merge_and_unload; an adapter for another base is refused with nothing written.

A tiny random llama saved with save_pretrained (tests/hf_parity.py) is the base on both sides.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hf_parity import BATCH, FP32_PARITY_RTOL, SEQ, batch, hf_model, rel_err, save_hf_checkpoint

peft = pytest.importorskip("peft")

RANK, ALPHA = 4, 8.0
TARGETS = ("q_proj", "v_proj", "down_proj")
MERGE_ATOL = 1e-6
"""merge-lora vs merge_and_unload: both compute W + (B A)·s with the same ops in the same order, so equal bits
are expected; 1e-6 absolute leaves room for a BLAS that blocks B A differently (weights are O(0.1))."""


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return save_hf_checkpoint(hf_model("llama", "sdpa"), "llama", tmp_path_factory.mktemp("base") / "llama")


def _plan(hf_dir: Path, **lora):
    from graphllm.plan import CompilePlan
    from graphllm.planning.lora_config import LoraConfig

    return CompilePlan(model=str(hf_dir), batch_size=BATCH, seq_len=SEQ, backend="eager",
                       lora=LoraConfig(**{"rank": RANK, "alpha": ALPHA, "target": TARGETS, **lora}))


def _graphllm_logits(plan, ckpt: Path, ids: torch.Tensor) -> torch.Tensor:
    """The LoRA plan's logits graph with its parameters (base and adapters) loaded from `ckpt`."""
    from graphllm.compile import compile_pipeline
    from graphllm.models import load_model
    from graphllm.parallel.checkpoint import load_checkpoint
    from graphllm.pass_pipeline import build_pipeline

    compiled = compile_pipeline(load_model(plan.model), (ids,), build_pipeline(plan))
    params = dict(compiled.result.model_graph.named_parameters())
    assert any(n.endswith(".lora_B") for n in params)
    load_checkpoint(ckpt, named_params=params, want_optim=False, st=None, expect_fingerprint=None)
    with torch.no_grad():
        return compiled(ids)


def _hf(hf_dir: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def trained(hf_dir, tmp_path_factory) -> Path:
    """A graphllm LoRA run of 2 steps on the HF base, checkpointed: ROOT (B is no longer zero)."""
    from graphllm.job import build
    from graphllm.resume import save_step
    from graphllm.train import TrainConfig, train_steps

    built = build(_plan(hf_dir))
    cfg = TrainConfig(steps=2, lr=1e-2, warmup_steps=1)
    opt = built.engine.make_optimizer(cfg)
    for r in train_steps(built.engine, lambda step: batch(seed=step), cfg, optimizer=opt):
        last = r["step"]
    root = tmp_path_factory.mktemp("run") / "ckpt"
    save_step(root, built, opt, last)
    return root


@pytest.fixture(scope="module")
def peft_adapter(hf_dir, tmp_path_factory) -> Path:
    """An adapter PEFT wrote itself: random A and B (init_lora_weights=False), rsLoRA scale."""
    torch.manual_seed(3)
    model = peft.get_peft_model(_hf(hf_dir), peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS),
                                                             use_rslora=True, init_lora_weights=False))
    out = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(out)
    return out


def test_peft_loads_graphllms_adapter_with_the_same_logits(hf_dir, trained, tmp_path):
    from graphllm.cli.main import main

    out = tmp_path / "adapter"
    assert main(["convert", "lora-to-peft", "--ckpt", str(trained), "--out", str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (RANK, ALPHA, sorted(TARGETS))
    ids, _ = batch(seed=7)
    want = _graphllm_logits(_plan(hf_dir), trained / "step_2", ids)
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(_hf(hf_dir), out)(input_ids=ids).logits
        base = _hf(hf_dir)(input_ids=ids).logits
    assert rel_err(base, want) > 100 * FP32_PARITY_RTOL, "the trained adapter does not change the logits"
    print(f"PEFT on graphllm's adapter vs graphllm: logits rel err {rel_err(got, want):.1e}")
    assert rel_err(got, want) <= FP32_PARITY_RTOL


def test_graphllm_loads_an_adapter_peft_wrote_with_the_same_logits(hf_dir, peft_adapter, tmp_path, capsys):
    from graphllm.cli.main import main
    from graphllm.planning.lora_config import LoraConfig

    root = tmp_path / "ckpt"
    assert main(["convert", "peft-to-graphllm", "--adapter", str(peft_adapter), "--hf", str(hf_dir),
                 "--out", str(root)]) == 0
    printed = capsys.readouterr().out
    assert f"--lora-rank {RANK} --lora-alpha {ALPHA:g} --lora-target down_proj,q_proj,v_proj --lora-rslora" in printed
    marker = json.loads((root / "step_0" / "graphllm_checkpoint.json").read_text())
    plan = _plan(hf_dir)
    plan.lora = LoraConfig(**{k: v for k, v in marker["lora"].items()})
    ids, _ = batch(seed=7)
    got = _graphllm_logits(plan, root / "step_0", ids)
    with torch.no_grad():
        want = peft.PeftModel.from_pretrained(_hf(hf_dir), peft_adapter)(input_ids=ids).logits
    print(f"graphllm on PEFT's adapter vs PEFT: logits rel err {rel_err(got, want):.1e}")
    assert rel_err(got, want) <= FP32_PARITY_RTOL


@pytest.mark.parametrize("source", ["peft", "graphllm"])
def test_merge_lora_equals_peft_merge_and_unload(hf_dir, peft_adapter, trained, tmp_path, source):
    from safetensors.torch import load_file

    from graphllm.cli.main import main

    adapter = peft_adapter
    if source == "graphllm":  # merge from the checkpoint; PEFT merges the same adapter exported
        adapter = tmp_path / "exported"
        assert main(["convert", "lora-to-peft", "--ckpt", str(trained), "--out", str(adapter)]) == 0
    out = tmp_path / "merged"
    src = trained if source == "graphllm" else peft_adapter
    assert main(["convert", "merge-lora", "--ckpt", str(src), "--hf", str(hf_dir), "--out", str(out)]) == 0
    got = load_file(str(out / "model.safetensors"))
    want = peft.PeftModel.from_pretrained(_hf(hf_dir), adapter).merge_and_unload().state_dict()
    assert set(got) == set(want) - {"lm_head.weight"} or set(got) == set(want)
    changed = [k for k in got if "proj" in k and not torch.equal(got[k], _hf(hf_dir).state_dict()[k])]
    assert len(changed) == 2 * len(TARGETS), changed  # 2 layers × the target projections
    worst = max((got[k] - want[k]).abs().max().item() for k in got)
    print(f"merge-lora ({source}) vs merge_and_unload: max abs diff {worst:.1e}")
    assert worst <= MERGE_ATOL, f"merged weights differ from merge_and_unload by {worst:.2e}"


def test_generate_merges_the_adapter_before_compiling(hf_dir, peft_adapter, tmp_path):
    """What `graphllm generate/chat/eval --lora` load: the base with the adapter merged, equal to merge-lora's."""
    from graphllm.cli.main import main
    from graphllm.lora_io import merged_model
    from graphllm.models import load_model

    assert main(["convert", "merge-lora", "--ckpt", str(peft_adapter), "--hf", str(hf_dir),
                 "--out", str(tmp_path / "m")]) == 0
    got, want = merged_model(str(hf_dir), peft_adapter).state_dict(), load_model(tmp_path / "m").state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_adapter_for_another_base_is_refused_and_nothing_written(hf_dir, peft_adapter, tmp_path, capsys,
                                                                  tmp_path_factory):
    from safetensors.torch import load_file, save_file

    from graphllm.cli.main import main

    other = save_hf_checkpoint(hf_model("mistral-gqa-headdim", "sdpa"), "mistral-gqa-headdim", tmp_path / "other")
    out = tmp_path / "merged"
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["convert", "merge-lora", "--ckpt", str(peft_adapter), "--hf", str(other), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    # the first mismatch in module order: down_proj agrees (same MLP), q_proj does not (head_dim 24 × 4 heads)
    assert "\n" not in err and "self_attn.q_proj for 64→64 features" in err and "is 64→96" in err, err
    assert not out.exists() and not list(tmp_path.glob(".merged*"))
    renamed = tmp_path / "renamed"  # same shapes, a layer the base lacks
    renamed.mkdir()
    (renamed / "adapter_config.json").write_bytes((peft_adapter / "adapter_config.json").read_bytes())
    tensors = load_file(str(peft_adapter / "adapter_model.safetensors"))
    save_file({k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}, str(renamed / "adapter_model.safetensors"))
    root = tmp_path / "ckpt"
    assert main(["convert", "peft-to-graphllm", "--adapter", str(renamed), "--hf", str(hf_dir), "--out", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.layers.7." in err and "does not have" in err, err
    assert not root.exists()
