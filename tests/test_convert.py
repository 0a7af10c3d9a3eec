"""`graphllm convert`: HF -> graphllm -> HF is bit-identical for every family, transformers loads the export
and agrees with graphllm, converted weights load into a tp=2 layout (real gloo ranks), checkpoints written
by training export too, and bad input is refused with one line, exit 2 and no partial output.

Reproduce: python -m pytest -q tests/test_convert.py
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from dist_util import run_ranks
from graphllm.cli.main import main
from graphllm.models import load_model, read_hf_state_dict
from hf_parity import (
    BATCH,
    FAMILIES,
    FP32_PARITY_RTOL,
    SEQ,
    VOCAB,
    batch,
    hf_model,
    rel_err,
    save_hf_checkpoint,
)

from graphllm.errors import GraphllmError
from graphllm.parallel.checkpoint import MARKER

SHARDED = "llama-bias-rope-llama3"  # saved by hf_parity with max_shard_size 40KB: the index path both ways
SMALL_SHARD = "40KB"
BF16_EXPORT_RTOL = 2e-2
"""transformers' bf16 forward vs graphllm's bf16 forward of the same bf16 weights: both round every matmul
and norm to bf16 (8 bits of mantissa) in different orders; ~1e-2 relative is bf16 rounding, as elsewhere."""


def convert(*args) -> int:
    return main(["convert", *map(str, args)])


def hf_dir(tmp_path_factory, family: str) -> Path:
    """A tiny random HF model of `family` with a real (word-level) tokenizer and a generation config."""
    root = tmp_path_factory.getbasetemp() / "hf" / family
    if root.exists():
        return root
    save_hf_checkpoint(hf_model(family, "sdpa"), family, root)
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                         eos_token="</s>").save_pretrained(root)
    transformers.GenerationConfig(bos_token_id=1, eos_token_id=2, max_new_tokens=7).save_pretrained(root)
    return root


def logits_agree(out: Path, dtype: torch.dtype = torch.float32) -> float:
    """Relative logits difference of transformers' from_pretrained(out) and graphllm's load_model(out)."""
    ids, _ = batch()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
    ours = load_model(out, dtype=dtype).eval()
    with torch.no_grad():
        return rel_err(ours(ids).float(), theirs(input_ids=ids).logits.float())


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k, t in want.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t), k


def no_temp_left(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_is_bit_identical_and_transformers_agrees(tmp_path_factory, tmp_path, family):
    src = hf_dir(tmp_path_factory, family)
    assert convert("hf-to-graphllm", "--hf", src, "--out", tmp_path / "ckpt") == 0
    marker = json.loads((tmp_path / "ckpt" / "step_0" / MARKER).read_text())
    assert marker["kind"] == "weights" and marker["step"] == 0
    shard = ["--max-shard-size", SMALL_SHARD] if family == SHARDED else []
    out = tmp_path / "out"
    assert convert("graphllm-to-hf", "--ckpt", tmp_path / "ckpt", "--out", out, *shard) == 0
    assert_same_tensors(read_hf_state_dict(out), read_hf_state_dict(src))
    assert (out / "model.safetensors.index.json").is_file() == (family == SHARDED)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    theirs = json.loads((src / "config.json").read_text())
    assert json.loads((out / "config.json").read_text()) == {**theirs, "dtype": "float32"}
    assert logits_agree(out) <= FP32_PARITY_RTOL
    tokenize = lambda d: transformers.AutoTokenizer.from_pretrained(d)("w5 w9 w3").input_ids
    assert tokenize(out) == tokenize(src)
    assert no_temp_left(tmp_path)


def test_bf16_both_ways(tmp_path_factory, tmp_path):
    src = hf_dir(tmp_path_factory, "qwen2-tied")
    assert convert("hf-to-graphllm", "--hf", src, "--out", tmp_path / "ckpt", "--dtype", "bf16") == 0
    assert json.loads((tmp_path / "ckpt" / "step_0" / MARKER).read_text())["dtypes"] == ["bfloat16"]
    assert convert("graphllm-to-hf", "--ckpt", tmp_path / "ckpt" / "step_0", "--out", tmp_path / "out") == 0
    want = {k: v.to(torch.bfloat16) for k, v in read_hf_state_dict(src).items()}
    assert_same_tensors(read_hf_state_dict(tmp_path / "out"), want)
    assert "lm_head.weight" not in want  # tied: stored once, as transformers does
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert logits_agree(tmp_path / "out", torch.bfloat16) <= BF16_EXPORT_RTOL
    # and back up: an fp32 export of the bf16 checkpoint holds the same values
    assert convert("graphllm-to-hf", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "fp32", "--dtype", "fp32") == 0
    assert_same_tensors(read_hf_state_dict(tmp_path / "fp32"), {k: v.float() for k, v in want.items()})


def tp2_worker(src: str, root: str, trained: str) -> dict:
    """Build a tp=2 artifact of `src`, zero its weights, --load the converted checkpoint, train a step, save."""
    from graphllm.job import build
    from graphllm.plan import CompilePlan
    from graphllm.planning import Layout
    from graphllm.planning.sharding import shard_of
    from graphllm.resume import load_step, save_step
    from graphllm.train import TrainConfig, train_steps

    built = build(CompilePlan(model=src, batch_size=BATCH, seq_len=SEQ, backend="eager", layout=Layout(tp=2)),
                  warm=False)
    with torch.no_grad():
        for p in built.engine.params:
            p.zero_()
    cfg = TrainConfig(steps=1, lr=1e-3, warmup_steps=1)
    opt = built.engine.make_optimizer(cfg)
    start = load_step(Path(root), built, opt)
    loaded = {n: (p.detach().clone(), shard_of(p)) for n, p in built.engine.named_params.items()}
    fresh = len(opt.state) == 0

    def batch_at(step: int):
        ids, targets = batch(seed=step)
        return ids, targets

    list(train_steps(built.engine, batch_at, cfg, optimizer=opt, start_step=start))
    save_step(Path(trained), built, opt, 1)
    after = {n: (p.detach().clone(), shard_of(p)) for n, p in built.engine.named_params.items()}
    return {"start": start, "fresh": fresh, "loaded": loaded, "after": after}


def test_converted_loads_into_tp2_and_trained_checkpoint_exports(tmp_path_factory, tmp_path):
    src = hf_dir(tmp_path_factory, "llama")
    assert convert("hf-to-graphllm", "--hf", src, "--out", tmp_path / "ckpt", "--tp", "2", "--pp", "2") == 0
    assert json.loads((tmp_path / "ckpt" / "step_0" / MARKER).read_text())["layout"] == "tp2×pp2×dp1"
    ranks = run_ranks(tp2_worker, 2, str(src), str(tmp_path / "ckpt"), str(tmp_path / "trained"))
    full = read_hf_state_dict(src)
    sharded = 0
    for r in ranks:
        assert r["start"] == 0 and r["fresh"]
        for name, (local, shard) in r["loaded"].items():
            want = shard.slice_of(full[name]) if shard is not None and shard.count > 1 else full[name]
            sharded += shard is not None and shard.count > 1
            assert torch.equal(local, want), name
    assert sharded > 0  # the layout really split the model
    # the tp=2 training checkpoint (optimizer state and all) exports; its weights are the ranks' pieces joined
    out = tmp_path / "out"
    assert convert("graphllm-to-hf", "--ckpt", tmp_path / "trained", "--out", out) == 0
    exported = read_hf_state_dict(out)
    for name, (local, shard) in ranks[0]["after"].items():
        joined = (torch.cat([r["after"][name][0] for r in ranks], shard.dim)
                  if shard is not None and shard.count > 1 else local)
        assert torch.equal(exported[name], joined), name
    assert not torch.equal(exported["model.norm.weight"], full["model.norm.weight"])  # it did train
    assert (out / "tokenizer.json").is_file()  # from the HF directory the run was compiled from
    assert logits_agree(out) <= FP32_PARITY_RTOL


def fake_built(model_name: str, model: torch.nn.Module) -> SimpleNamespace:
    """What save_step/load_step read from a Built, for a model that needs no compiled graph."""
    from graphllm.parallel.engine import persistent_buffers
    from graphllm.plan import CompilePlan

    return SimpleNamespace(model=model, plan=CompilePlan(model=model_name), rank=0,
                           engine=SimpleNamespace(named_params=dict(model.named_parameters()), st=None,
                                                  named_state=persistent_buffers(model)))


def test_preset_training_checkpoint_exports_with_its_config(tmp_path, caplog):
    """run --load ROOT --save ROOT on a preset: the steps beside the converted step_0 export with its files."""
    from graphllm.models import save_hf

    from graphllm.resume import load_step, save_step

    model = load_model("tiny-llama", seed=3)
    tok = tmp_path / "hf_tiny"
    save_hf(model, model.config, tok)
    transformers.PreTrainedTokenizerFast(tokenizer_object=_tiny_bpe()).save_pretrained(tok)
    assert convert("hf-to-graphllm", "--hf", tok, "--out", tmp_path / "run") == 0
    fresh = load_model("tiny-llama", seed=4)  # what `run --load` does with it: weights, step 0, says so
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    assert load_step(tmp_path / "run", fake_built("tiny-llama", fresh), fresh_opt) == 0
    assert_same_tensors(dict(fresh.state_dict()), dict(model.state_dict()))
    assert not fresh_opt.state and "holds weights only" in caplog.text and "step 0" in caplog.text
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 8000, (1, 8))
    model(ids).float().logsumexp(-1).mean().backward()
    opt.step()
    built = fake_built("tiny-llama", model)
    save_step(tmp_path / "run", built, opt, 3)
    save_step(tmp_path / "run", built, opt, 5)
    out = tmp_path / "out"
    assert convert("graphllm-to-hf", "--ckpt", tmp_path / "run", "--out", out) == 0  # root -> newest, step_5
    want = {n: p.detach() for n, p in model.named_parameters()}
    assert_same_tensors(read_hf_state_dict(out), want)
    assert (out / "tokenizer.json").read_bytes() == (tok / "tokenizer.json").read_bytes()  # from step_0/hf
    assert logits_agree(out) <= FP32_PARITY_RTOL
    # a marker that predates "config", with no HF files anywhere: the preset it names gives config.json
    marker_path = tmp_path / "run" / "step_3" / MARKER
    marker = json.loads(marker_path.read_text())
    del marker["config"]
    marker_path.write_text(json.dumps(marker))
    (tmp_path / "run" / "step_3").rename(tmp_path / "step_3")
    assert convert("graphllm-to-hf", "--ckpt", tmp_path / "step_3", "--out", tmp_path / "old") == 0
    assert_same_tensors(read_hf_state_dict(tmp_path / "old"), want)
    assert json.loads((tmp_path / "old" / "config.json").read_text()) == {**model.config.to_hf(), "dtype": "float32"}
    assert not (tmp_path / "old" / "tokenizer.json").exists()
    assert convert("graphllm-to-hf", "--ckpt", tmp_path / "step_3", "--out", tmp_path / "old", "--force",
                   "--tokenizer", tok) == 0
    assert (tmp_path / "old" / "tokenizer.json").read_bytes() == (tok / "tokenizer.json").read_bytes()


def _tiny_bpe():
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    return Tokenizer(BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))


def test_bad_input_one_line_exit_2_nothing_written(tmp_path_factory, tmp_path, capsys):
    src = hf_dir(tmp_path_factory, "qwen2-tied")

    def refused(*args, match: str) -> None:
        capsys.readouterr()
        assert convert(*args) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and "\n" not in err, err

    (tmp_path / "noconfig").mkdir()
    refused("hf-to-graphllm", "--hf", tmp_path / "noconfig", "--out", tmp_path / "a", match="has no config.json")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_bytes((src / "config.json").read_bytes())
    refused("hf-to-graphllm", "--hf", tmp_path / "noweights", "--out", tmp_path / "a",
            match="has neither model.safetensors")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_bytes((hf_dir(tmp_path_factory, "llama") / "config.json").read_bytes())
    (tmp_path / "other" / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    refused("hf-to-graphllm", "--hf", tmp_path / "other", "--out", tmp_path / "a", match="a checkpoint for another model")
    (tmp_path / "other" / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:5000])
    refused("hf-to-graphllm", "--hf", tmp_path / "other", "--out", tmp_path / "a",
            match="is not a readable safetensors file")
    refused("hf-to-graphllm", "--hf", src, "--out", tmp_path / "a", "--tp", "3",
            match="--tp 3 does not divide the model's attention heads")
    refused("hf-to-graphllm", "--hf", src, "--out", tmp_path / "a", "--pp", "8", match="8 stages but the model has")
    assert not (tmp_path / "a").exists() and no_temp_left(tmp_path)

    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    refused("hf-to-graphllm", "--hf", src, "--out", user, match="exists and is not empty")
    assert convert("hf-to-graphllm", "--hf", src, "--out", user, "--force") == 0
    assert convert("hf-to-graphllm", "--hf", src, "--out", user, "--force") == 0  # replaces its own step_0
    assert (user / "notes.txt").read_text() == "mine" and sorted(p.name for p in user.iterdir()) == ["notes.txt",
                                                                                                      "step_0"]
    # a converted checkpoint for another model is refused when loaded into this one's artifact
    from graphllm.resume import load_step

    other = load_model("tiny-llama")
    with pytest.raises(GraphllmError, match="is for another model"):
        load_step(user, fake_built("tiny-llama", other), torch.optim.AdamW(other.parameters()))

    refused("graphllm-to-hf", "--ckpt", tmp_path / "noconfig", "--out", tmp_path / "b",
            match="is not a graphllm checkpoint")
    refused("graphllm-to-hf", "--ckpt", user, "--out", tmp_path / "b", "--max-shard-size", "lots",
            match="--max-shard-size 'lots' is not a size")
    refused("graphllm-to-hf", "--ckpt", user, "--out", tmp_path / "b", "--tokenizer", tmp_path / "noconfig",
            match="is not a directory with tokenizer files")
    assert not (tmp_path / "b").exists()
    # --force over an earlier sharded export: old shards go, the user's files stay, the result loads
    out = tmp_path / "out"
    assert convert("graphllm-to-hf", "--ckpt", user, "--out", out, "--max-shard-size", SMALL_SHARD) == 0
    (out / "README.md").write_text("model card")
    refused("graphllm-to-hf", "--ckpt", user, "--out", out, match="exists and is not empty")
    assert convert("graphllm-to-hf", "--ckpt", user, "--out", out, "--force") == 0
    assert not list(out.glob("model-*")) and not (out / "model.safetensors.index.json").exists()
    assert (out / "README.md").read_text() == "model card"
    assert_same_tensors(read_hf_state_dict(out), read_hf_state_dict(src))
    assert no_temp_left(tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_follow_the_umask(tmp_path_factory, tmp_path, umask):
    """A serving process under another uid reads the export: every file and directory convert writes gets the
    mode open()/mkdir() give under the user's umask, not mkstemp's or safetensors' 0600, mkdtemp's 0700, or the
    mode of a private source file it copies."""
    import os
    import shutil
    import stat

    src = tmp_path / "src"
    shutil.copytree(hf_dir(tmp_path_factory, "llama"), src)
    os.chmod(src / "tokenizer.json", 0o600)
    old = os.umask(umask)
    try:
        assert convert("hf-to-graphllm", "--hf", src, "--out", tmp_path / "ckpt") == 0
        out = tmp_path / "out"
        assert convert("graphllm-to-hf", "--ckpt", tmp_path / "ckpt", "--out", out,
                       "--max-shard-size", SMALL_SHARD) == 0
    finally:
        os.umask(old)
    written = [out, *out.rglob("*"), *(tmp_path / "ckpt" / "step_0" / "hf").rglob("*")]
    modes = {p.relative_to(tmp_path).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in written}
    want = {p.relative_to(tmp_path).as_posix(): oct((0o777 if p.is_dir() else 0o666) & ~umask) for p in written}
    assert (out / "model.safetensors.index.json").is_file() and "ckpt/step_0/hf/tokenizer.json" in modes
    assert modes == want


def test_a_full_disk_is_one_line_and_keeps_the_earlier_output(tmp_path_factory, tmp_path, monkeypatch, capsys):
    """No space left while writing, either way (safetensors' SafetensorError, which is not an OSError, and the
    checkpoint writer's OSError): one line naming --out and the room the weights take, exit 2, no temp directory
    left, and the export that --force was replacing still whole."""
    import errno

    import graphllm.convert as convert_module
    import graphllm.models.weights as weights_module
    from safetensors import SafetensorError

    src = hf_dir(tmp_path_factory, "llama")
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    assert convert("hf-to-graphllm", "--hf", src, "--out", ckpt) == 0
    assert convert("graphllm-to-hf", "--ckpt", ckpt, "--out", out) == 0
    before = read_hf_state_dict(out)

    def full_safetensors(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def full_checkpoint(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(weights_module, "save_file", full_safetensors)
    monkeypatch.setattr(convert_module, "save_checkpoint", full_checkpoint)
    for args, dest in ((("graphllm-to-hf", "--ckpt", ckpt, "--out", out, "--force"), out),
                       (("hf-to-graphllm", "--hf", src, "--out", tmp_path / "ckpt2"), tmp_path / "ckpt2")):
        capsys.readouterr()
        assert convert(*args) == 2
        err = capsys.readouterr().err.strip()
        assert f"--out {dest}: no space left on device" in err and "\n" not in err, err
    assert not (tmp_path / "ckpt2").exists() and no_temp_left(tmp_path)
    assert_same_tensors(read_hf_state_dict(out), before)
