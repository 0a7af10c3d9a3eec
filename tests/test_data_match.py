"""Data that matches the model: tokenizer fingerprints, recorded by `graphllm preprocess` (every kind) and by
`graphllm compile` (the model's own tokenizer, the built-in one for presets); `graphllm run --data` refuses
another tokenizer's data before compiling and warns when the match cannot be checked; an HF model without
`--data` reads the built-in corpus in its own tokenizer; pretrained weights get a fine-tuning lr by default.

Reproduce: python -m pytest -q tests/test_data_match.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from graphllm.cli.main import EXIT_USER_ERROR, main

from graphllm.data.corpus import builtin_documents
from graphllm.data.encoders import HuggingFaceEncoder, load_encoder, resolve_spec, vocab_fingerprint

VOCAB, SEQ = 8192, 16  # micro models embed every built-in id: a wrong tokenizer's ids fit, only the check refuses
EOS = "</s>"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% if m.role == 'assistant' %}{{ eos_token }}"
                 "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
PINNED = "d1d59824bd70db5a"
"""vocab_fingerprint of the two-token vocabulary below: the canonical form is part of every recorded fingerprint
(meta files, plan.json), so changing it must be deliberate (old data would stop matching)."""


def save_tokenizer(path: Path, *, vocab_size: int = 1024, eos: str = EOS, extra: tuple[str, ...] = ()) -> Path:
    """A byte-level BPE trained on the start of the built-in corpus (deterministic), with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<s>", EOS, "<|user|>", "<|assistant|>", "<|system|>", *extra]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(builtin_documents()[:200], trainer)
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token=eos,
                            chat_template=CHAT_TEMPLATE).save_pretrained(path)
    return path


def _micro_hf(path: Path) -> Path:
    from graphllm.models import build_model, save_hf
    from graphllm.models.presets import PRESETS

    cfg = dataclasses.replace(PRESETS["tiny-llama"](), vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return save_hf(build_model(cfg), cfg, path)


def _compile(model: str, out: Path) -> Path:
    assert main(["compile", "--model", model, "--out", str(out), "--backend", "eager", "--batch-size", "2",
                 "--seq-len", str(SEQ)]) == 0
    return out


def _plan_model(art: Path) -> dict:
    return json.loads((art / "plan.json").read_text())["model"]


def _preprocess(kind: str, records: list[dict], tokenizer: str, out: Path) -> dict:
    src = out.parent / f"{out.name}.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["preprocess", kind, "--input", str(src), "--tokenizer", tokenizer, "--out", str(out)]) == 0
    return json.loads(Path(f"{out}_meta.json").read_text())


TEXTS = [{"text": doc} for doc in builtin_documents()[1000:1060]]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("match")
    tok = save_tokenizer(root / "tok")
    hf = _micro_hf(root / "hf")
    for f in tok.iterdir():
        shutil.copy(f, hf / f.name)
    bare = _micro_hf(root / "bare")
    arts = {name: _compile(model, root / f"art_{name}")
            for name, model in (("hf", str(hf)), ("bare", str(bare)), ("preset", "tiny-llama"))}
    _preprocess("pretrain", TEXTS, "builtin", root / "data_builtin")
    _preprocess("pretrain", TEXTS, str(hf), root / "data_hf")
    return {"root": root, "tok": tok, "hf": hf, "bare": bare, **{f"art_{k}": v for k, v in arts.items()},
            "data_builtin": root / "data_builtin", "data_hf": root / "data_hf"}


# -- fingerprints ---------------------------------------------------------------------------------------
def test_fingerprint_is_canonical_and_follows_vocab_and_special_tokens(tmp_path) -> None:
    special = {"bos": None, "eos": (1, "b"), "pad": None, "unk": (0, "a")}
    assert vocab_fingerprint([("b", 1), ("a", 0)], special) == vocab_fingerprint([("a", 0), ("b", 1)], special)
    assert vocab_fingerprint([("a", 0), ("b", 1)], special) == PINNED
    # the built-in sentencepiece model: the same file elsewhere (another machine's cache) gives the same one
    builtin = load_encoder(resolve_spec("builtin"), "builtin")
    copy = tmp_path / "copy.model"
    shutil.copy(resolve_spec("builtin"), copy)
    assert load_encoder(str(copy)).fingerprint() == builtin.fingerprint()
    # Hugging Face directories: the same tokenizer saved twice agrees; another vocabulary or EOS does not
    a, b = save_tokenizer(tmp_path / "a"), save_tokenizer(tmp_path / "b")
    fa = HuggingFaceEncoder(a).fingerprint()
    assert HuggingFaceEncoder(b).fingerprint() == fa and len(fa) == 16
    others = {"vocab": save_tokenizer(tmp_path / "v", vocab_size=1000),
              "eos": save_tokenizer(tmp_path / "e", eos="<s>"),
              "added": save_tokenizer(tmp_path / "x", extra=("<|tool|>",))}
    got = {k: HuggingFaceEncoder(p).fingerprint() for k, p in others.items()}
    assert len({fa, builtin.fingerprint(), *got.values()}) == 5, got
    saved = json.loads((a / "tokenizer.json").read_text())
    ids = saved["model"]["vocab"]
    x, y = sorted(ids, key=ids.get)[-2:]
    ids[x], ids[y] = ids[y], ids[x]  # the same tokens, two ids swapped
    (a / "tokenizer.json").write_text(json.dumps(saved))
    assert HuggingFaceEncoder(a).fingerprint() != fa


CHAT_RECORDS = {
    "alpaca": [{"instruction": "Say hi.", "output": "Hi there."}, {"instruction": "Count.", "output": "1 2 3"}],
    "sharegpt": [{"conversations": [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hello."}]}],
    "pairwise": [{"prompt": "Pick one.", "chosen": "This one.", "rejected": "No."}],
    "prm": [{"question": "1+1?", "steps": ["1+1 is 2.", "So 2."], "labels": ["+", "+"]}],
}


@pytest.mark.parametrize("kind", ["pretrain", *CHAT_RECORDS])
def test_every_preprocess_kind_records_the_tokenizer(tmp_path, kind) -> None:
    tok = save_tokenizer(tmp_path / "tok")
    records = TEXTS[:3] if kind == "pretrain" else CHAT_RECORDS[kind]
    meta = _preprocess(kind, records, str(tok), tmp_path / "out")
    want = HuggingFaceEncoder(tok)
    assert (meta["tokenizer"], meta["tokenizer_fingerprint"], meta["vocab_size"]) == (
        str(tok), want.fingerprint(), want.vocab_size)
    if kind == "pretrain":  # and the built-in tokenizer, spelled as given
        meta = _preprocess(kind, records, "builtin", tmp_path / "b")
        builtin = load_encoder(resolve_spec("builtin"))
        assert (meta["tokenizer"], meta["tokenizer_fingerprint"], meta["vocab_size"]) == (
            "builtin", builtin.fingerprint(), 8000)


def test_artifact_records_the_model_tokenizer(env) -> None:
    hf = HuggingFaceEncoder(env["hf"])
    assert _plan_model(env["art_hf"])["tokenizer"] == {"spec": str(env["hf"].resolve()),
                                                       "fingerprint": hf.fingerprint(), "vocab_size": hf.vocab_size}
    assert _plan_model(env["art_bare"])["tokenizer"] is None  # an HF directory without tokenizer files
    builtin = load_encoder(resolve_spec("builtin"))
    assert _plan_model(env["art_preset"])["tokenizer"] == {"spec": "builtin", "fingerprint": builtin.fingerprint(),
                                                           "vocab_size": 8000}


# -- graphllm run --data ---------------------------------------------------------------------------------
@pytest.mark.parametrize("art, data, model_spec, data_spec", [
    ("art_hf", "data_builtin", "hf", "builtin"),
    ("art_preset", "data_hf", "builtin", "hf"),
])
def test_run_refuses_another_tokenizers_data_before_compiling(env, capsys, monkeypatch, art, data, model_spec,
                                                              data_spec) -> None:
    import graphllm.job

    def no_compile(*a, **k):
        raise AssertionError("compiled before refusing the data")

    monkeypatch.setattr(graphllm.job, "load_artifact", no_compile)
    capsys.readouterr()
    assert main(["run", str(env[art]), "--data", str(env[data]), "--steps", "1", "--no-progress"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    meta = json.loads(Path(f"{env[data]}_meta.json").read_text())
    model_tok = _plan_model(env[art])["tokenizer"]
    specs = {"hf": str(env["hf"]), "builtin": "builtin"}
    assert meta["tokenizer"] == specs[data_spec] and meta["tokenizer_fingerprint"] in err
    assert f"{specs[data_spec]} (fingerprint {meta['tokenizer_fingerprint']})" in err
    assert f"{model_tok['spec']} (fingerprint {model_tok['fingerprint']})" in err
    assert f"preprocess the data again with --tokenizer {model_tok['spec']}" in err


def test_matching_data_trains_and_unchecked_data_warns(env, tmp_path, caplog) -> None:
    argv = ["--steps", "2", "--no-progress", "--threads", "1", "--metrics", str(tmp_path / "m.jsonl")]
    with caplog.at_level("WARNING"):
        assert main(["run", str(env["art_hf"]), "--data", str(env["data_hf"]), *argv]) == 0
    assert "cannot check" not in caplog.text
    old = tmp_path / "old"  # as preprocessed before fingerprints: no tokenizer_fingerprint in the meta file
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{env['data_hf']}{suffix}", f"{old}{suffix}")
    meta = json.loads(Path(f"{env['data_hf']}_meta.json").read_text())
    del meta["tokenizer_fingerprint"]
    Path(f"{old}_meta.json").write_text(json.dumps(meta))
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main(["run", str(env["art_hf"]), "--data", str(old), *argv]) == 0
    warned = [r.getMessage() for r in caplog.records if "cannot check" in r.getMessage()]
    assert len(warned) == 1 and f"--data {old}" in warned[0] and "rerun graphllm preprocess" in warned[0]
    caplog.clear()
    with caplog.at_level("WARNING"):  # a model without tokenizer files: accepted, and said
        assert main(["run", str(env["art_bare"]), "--data", str(env["data_hf"]), *argv]) == 0
    assert "has no tokenizer files: cannot check that --data" in caplog.text


# -- the built-in corpus without --data ------------------------------------------------------------------
def test_hf_model_reads_the_builtin_corpus_in_its_own_tokenizer(env, caplog) -> None:
    from graphllm.data import builtin_token_ids, builtin_tokenizer
    from graphllm.plan import CompilePlan
    from graphllm.run_config import RunConfig, open_feed

    def train_ids(art: Path):
        plan = CompilePlan.from_json(json.loads((art / "plan.json").read_text())["plan"], "plan.json")
        return open_feed(art, plan, VOCAB, RunConfig()).batches.train_ids  # the old call: plan.json read inside

    hf = HuggingFaceEncoder(env["hf"])
    first = builtin_documents()[0]
    want = hf.encode(first) + [hf.eos_id]
    assert train_ids(env["art_hf"])[:len(want)].tolist() == want
    spm = builtin_tokenizer()
    assert (train_ids(env["art_preset"]) == builtin_token_ids(spm)[:len(train_ids(env["art_preset"]))]).all()
    with caplog.at_level("WARNING"):  # no tokenizer in the directory: the built-in one, with a warning
        bare = train_ids(env["art_bare"])
    assert bare[:5].tolist() == spm.encode(first)[:5] and "has no tokenizer files" in caplog.text


# -- the learning rate -----------------------------------------------------------------------------------
def test_pretrained_weights_get_the_fine_tuning_lr_unless_given(env, capsys) -> None:
    from graphllm.options import add_flags, from_flags
    from graphllm.run_config import RunConfig, fine_tuning_note, with_model_defaults

    def config(*argv: str) -> RunConfig:
        p = argparse.ArgumentParser()
        add_flags(p, RunConfig)
        return from_flags(RunConfig, p.parse_args(list(argv)))

    hf, preset = _plan_model(env["art_hf"]), _plan_model(env["art_preset"])
    assert with_model_defaults(config(), hf).train.lr == 1e-5
    assert with_model_defaults(config(), preset).train.lr == 3e-3
    assert with_model_defaults(config("--lr", "3e-3"), hf).train.lr == 3e-3  # given: kept, even the same value
    assert with_model_defaults(RunConfig(), hf).train.lr == 1e-5  # the Python API the same
    assert fine_tuning_note(with_model_defaults(config(), hf), hf) == (
        f"pretrained weights from {hf['source']}: fine-tuning lr 1e-05 (--lr to change)")
    assert fine_tuning_note(config(), preset) is None and fine_tuning_note(config("--lr", "1e-4"), hf) is None
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "1e-05 (fine-tuning) for pretrained weights" in " ".join(capsys.readouterr().out.split())
