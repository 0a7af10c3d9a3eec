"""`graphllm preprocess alpaca|sharegpt|pairwise|prm`: exact loss masks from chat templates and the
built-in Alpaca template, packing layout, pairwise alignment, PRM step labels, malformed-record
accounting, strict mode, and worker-count independence. Fixture files and tokenizers are made here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from graphllm.cli.main import main
from graphllm.models.llama import IGNORE_INDEX

from graphllm.data.indexed import IndexedReader
from graphllm.data.sft import ChatDataConfig, preprocess_chat
from graphllm.data.templates import ALPACA_SYSTEM, ALPACA_USER
from graphllm.data.tokenizer import builtin_tokenizer

EOS = "</s>"
# role markers are special tokens; the assistant turn ends with EOS, so a turn's trained text is content + EOS
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% if m.role == 'assistant' %}{{ eos_token }}"
                 "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
# renders the message count first: every prefix rendering differs from the start of the whole conversation
UNSTABLE_TEMPLATE = "{{ messages | length }}" + CHAT_TEMPLATE


def _hf_dir(path: Path, template: str | None) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  special_tokens=["<s>", EOS, "<|user|>", "<|assistant|>", "<|system|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["Hello world, how are you? I am fine, thanks.", "The quick brown fox."] * 5, trainer)
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token=EOS,
                            chat_template=template).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from transformers import AutoTokenizer

    path = _hf_dir(tmp_path_factory.mktemp("hf"), CHAT_TEMPLATE)
    return path, AutoTokenizer.from_pretrained(str(path), local_files_only=True)


@pytest.fixture(scope="module")
def spm():
    return builtin_tokenizer()  # the default cache, shared with test_data.py: trained once per machine


def _write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def _samples(prefix: Path, side: str = "") -> list[tuple[list[int], list[int]]]:
    ids = IndexedReader(f"{prefix}_{side}input_ids_document")
    labels = IndexedReader(f"{prefix}_{side}labels_document")
    assert (ids.sequence_lengths == labels.sequence_lengths).all()
    assert (ids.document_indices == labels.document_indices).all()
    return [(ids[i].tolist(), labels[i].tolist()) for i in range(len(ids))]


def _trained(labels: list[int]) -> list[int]:
    return [x for x in labels if x != IGNORE_INDEX]


def _runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The maximal runs of trained positions, as token lists; checks labels == ids where trained."""
    runs, cur = [], []
    for t, lab in zip(ids, labels, strict=True):
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == t
            cur.append(t)
    return runs + ([cur] if cur else [])


def _run(tmp_path: Path, name: str = "o", **cfg):
    return preprocess_chat(ChatDataConfig(**cfg, out=tmp_path / name))


def test_alpaca_chat_template_masks_exact(hf, tmp_path: Path) -> None:
    path, tok = hf
    rec = {"instruction": "Hello world", "input": "how are you?", "output": "I am fine, thanks."}
    src = _write(tmp_path / "a.jsonl", [rec])
    s = _run(tmp_path, kind="alpaca", inputs=[src], tokenizer=str(path))
    [(ids, labels)] = _samples(tmp_path / "o")
    messages = [{"role": "user", "content": "Hello world\n\nhow are you?"}, {"role": "assistant", "content": rec["output"]}]
    assert ids == tok.encode(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
    assert _runs(ids, labels) == [tok.encode(rec["output"] + EOS, add_special_tokens=False)]
    assert tok.decode(_trained(labels)) == rec["output"] + EOS
    meta = json.loads((tmp_path / "o_meta.json").read_text())
    assert meta["kind"] == "sft" and meta["template"] == "chat" and not meta["packed"] and meta["seq_len"] is None
    assert (meta["documents"], meta["samples"], meta["tokens"]) == (1, 1, len(ids)) == (s.documents, s.samples, s.tokens)
    assert s.trained_tokens == len(_trained(labels))


def test_sharegpt_multi_turn_system_and_openai_form(hf, tmp_path: Path) -> None:
    path, tok = hf
    turns = [("Hello", "world"), ("how are you?", "I am fine.")]
    sharegpt = {"conversations": [{"from": "system", "value": "Be brief."}]
                + [m for q, a in turns for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]}
    openai = {"system": "Be brief.",
              "messages": [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]}
    src = _write(tmp_path / "c.jsonl", [sharegpt, openai])
    _run(tmp_path, kind="sharegpt", inputs=[src], tokenizer=str(path))
    (ids, labels), other = _samples(tmp_path / "o")
    assert other == (ids, labels)  # the two schemas describe the same conversation
    assert tok.decode(ids).startswith("<|system|>Be brief.<|user|>Hello<|assistant|>")
    assert [tok.decode(r) for r in _runs(ids, labels)] == [a + EOS for _, a in turns]


def test_builtin_alpaca_template_exact_tokens(spm, tmp_path: Path) -> None:
    rec = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "history": [["Hi", "Hello!"]]}
    src = _write(tmp_path / "a.jsonl", [rec])
    s = _run(tmp_path, kind="alpaca", inputs=[src], tokenizer=str(spm.path))  # no chat template: falls back
    [(ids, labels)] = _samples(tmp_path / "o")
    e, m = spm.encode, IGNORE_INDEX
    pieces = [(e(ALPACA_SYSTEM + "\n\n"), False), (e(ALPACA_USER.format(content="Hi")), False),
              (e("Hello!") + [spm.eos_id], True),
              (e(ALPACA_USER.format(content="Add the numbers.\n\n### Input:\n2 and 3")), False), (e("5") + [spm.eos_id], True)]
    assert ids == [t for p, _ in pieces for t in p]
    assert labels == [t if trained else m for p, trained in pieces for t in p]
    assert json.loads((tmp_path / "o_meta.json").read_text())["template"] == "alpaca" and s.samples == 1


def test_packing_keeps_sample_boundaries(spm, tmp_path: Path) -> None:
    records = [{"instruction": f"Say {'ab ' * (i % 7)}", "output": "x" * (i % 5 + 1)} for i in range(40)]
    records.append({"instruction": "Say", "output": "long " * 300})  # longer than any document
    records.append({"instruction": "long " * 300, "output": "y"})  # its response starts after token 96
    src = _write(tmp_path / "a.jsonl", records)
    base = {"kind": "alpaca", "inputs": [src], "tokenizer": "builtin", "seq_len": 96}
    plain = _run(tmp_path, "plain", **base)
    packed = _run(tmp_path, "packed", **base, pack=True)
    assert plain.overlong == packed.overlong == 2 and plain.samples == packed.samples == 40
    unpacked = _samples(tmp_path / "plain")
    reader = IndexedReader(tmp_path / "packed_input_ids_document")
    assert _samples(tmp_path / "packed") == unpacked  # the same sequences, in order
    docs = reader.document_indices
    assert reader.num_documents == packed.documents < packed.samples and docs[-1] == 40
    lengths = [int(reader.sequence_lengths[docs[k]:docs[k + 1]].sum()) for k in range(reader.num_documents)]
    assert max(lengths) <= 96
    # next-fit: a document is closed only when the following sample would not fit
    firsts = [len(unpacked[docs[k + 1]][0]) for k in range(reader.num_documents - 1)]
    assert all(n + f > 96 for n, f in zip(lengths, firsts, strict=False))
    meta = json.loads((tmp_path / "packed_meta.json").read_text())
    assert meta["packed"] and meta["seq_len"] == 96 and meta["pack_algorithm"] == "next-fit"
    trunc = _run(tmp_path, "trunc", **base, overlong="truncate")
    # truncation keeps the first sample's trained head; the second would keep no trained token: skipped
    assert trunc.samples == 41 and trunc.overlong == 2
    ids, labels = _samples(tmp_path / "trunc")[-1]
    assert len(ids) == 96 and spm.decode(_trained(labels)).startswith("long long")


def test_pairwise_aligned_by_index(hf, tmp_path: Path) -> None:
    path, tok = hf
    history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "world"},
               {"role": "user", "content": "how are you?"}]
    records = [{"prompt": "Hello", "chosen": "I am fine.", "rejected": "The fox."},
               {"prompt": "Hello", "chosen": "x"},  # missing rejected: dropped from both sides
               {"prompt": history, "chosen": [{"role": "assistant", "content": "fine"}], "rejected": "brown"},
               {"prompt": "quick", "chosen": [{"role": "user", "content": "quick"}, {"role": "assistant", "content": "fox"}],
                "rejected": [{"role": "user", "content": "slow"}, {"role": "assistant", "content": "dog"}]}]
    src = _write(tmp_path / "p.jsonl", records)
    s = _run(tmp_path, kind="pairwise", inputs=[src], tokenizer=str(path))
    assert s.samples == 2 and s.skipped == {"missing_key": 1, "prompt_mismatch": 1}
    assert [no for _, no, _ in s.bad_lines] == [2, 4]
    chosen, rejected = _samples(tmp_path / "o", "chosen_"), _samples(tmp_path / "o", "rejected_")
    for (c, cl), (r, rl), want in zip(chosen, rejected, [("I am fine.", "The fox."), ("fine", "brown")], strict=True):
        n = len(c) - len(_trained(cl))
        assert c[:n] == r[:n] and _trained(cl[:n]) == [] == _trained(rl[:n])  # same prompt, untrained
        assert (tok.decode(_trained(cl)), tok.decode(_trained(rl))) == (want[0] + EOS, want[1] + EOS)
    assert "<|assistant|>world</s>" in tok.decode(chosen[1][0])  # history answer present but not trained
    meta = json.loads((tmp_path / "o_meta.json").read_text())
    assert meta["kind"] == "pairwise" and meta["tokens"] == sum(len(x) for x, _ in chosen + rejected)


def test_prm_step_labels(hf, tmp_path: Path) -> None:
    path, tok = hf
    records = [{"question": "Hello?", "steps": ["I am", "fine", "thanks"], "labels": ["+", 0, True]},
               {"input": "Q: quick ки\nbrown ки\nfox ки", "label": "Q: quick +\nbrown -\nfox +"},
               {"question": "x", "steps": ["a", "b"], "labels": ["+"]},
               {"input": "a ки b ки", "label": "a + b ?"}]
    src = _write(tmp_path / "r.jsonl", records)
    s = _run(tmp_path, kind="prm", inputs=[src], tokenizer=str(path))  # default step tag " ки"
    assert s.skipped == {"label_count": 1, "bad_label": 1}
    meta = json.loads((tmp_path / "o_meta.json").read_text())["prm"]
    good, bad, tag = meta["good_id"], meta["bad_id"], meta["step_tag_ids"]
    assert (good, bad) == (tok.convert_tokens_to_ids("+"), tok.convert_tokens_to_ids("-"))
    structured, shepherd = _samples(tmp_path / "o")
    for (ids, labels), want in ((structured, [good, bad, good]), (shepherd, [good, bad, good])):
        marks = [i for i, x in enumerate(labels) if x != IGNORE_INDEX]
        assert [labels[i] for i in marks] == want
        assert all(ids[i:i + len(tag)] == tag for i in marks)  # each label sits on its step tag's first token
    ids, _ = structured
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hello?"}], tokenize=False, add_generation_prompt=True)
    assert tok.decode(ids) == prompt + "I am ки\nfine ки\nthanks ки"
    assert tok.decode(shepherd[0]) == records[1]["input"]


def test_malformed_records_counted_by_line(hf, tmp_path: Path) -> None:
    path, _ = hf
    ok = {"conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "world"}]}
    lines = [json.dumps(ok),                                                            # 1
             "{not json",                                                               # 2 invalid_json
             json.dumps({"chat": []}),                                                  # 3 missing_key
             json.dumps({"conversations": "hi"}),                                       # 4 wrong_type
             json.dumps({"conversations": []}),                                         # 5 empty_conversation
             json.dumps({"conversations": [ok["conversations"][0]] * 2}),               # 6 not_alternating
             json.dumps({"conversations": [{"from": "bot", "value": "x"}]}),            # 7 unknown_role
             json.dumps({"conversations": ok["conversations"][:1]}),                    # 8 ends with the user
             "", json.dumps(ok)]                                                        # 9 blank, 10 good
    src = tmp_path / "m.jsonl"
    src.write_bytes(("\n".join(lines) + "\n").encode() + b'{"conversations": "\xff"}\n')  # 11 invalid_utf8
    s = _run(tmp_path, kind="sharegpt", inputs=[src], tokenizer=str(path))
    assert s.samples == 2
    assert s.skipped == {"invalid_json": 1, "missing_key": 1, "wrong_type": 1, "empty_conversation": 1,
                         "not_alternating": 2, "unknown_role": 1, "invalid_utf8": 1}
    assert [no for _, no, _ in s.bad_lines] == [2, 3, 4, 5, 6, 7, 8, 11]
    # a JSON array reports the line each element starts on
    arr = tmp_path / "a.json"
    arr.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c"},\n  {"instruction": "d",\n'
                   '   "output": 5}\n]\n')
    s = _run(tmp_path, "arr", kind="alpaca", inputs=[arr], tokenizer=str(path))
    assert s.samples == 1 and [(no, d) for _, no, d in s.bad_lines] == [(3, "missing key 'output'"),
                                                                         (4, "'output' is int, not a string")]


def _cli(kind: str, *argv: str) -> int:
    return main(["preprocess", kind, *argv])


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_strict_exit_2_writes_nothing(hf, tmp_path: Path, capsys) -> None:
    path, _ = hf
    src = _write(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": ["b"]}])
    assert _cli("alpaca", "--input", str(src), "--tokenizer", str(path), "--out", str(tmp_path / "s"), "--strict") == 2
    assert f"{src}:2: 'output' is list, not a string" in _error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]


def test_user_errors(hf, spm, tmp_path: Path, capsys) -> None:
    path, _ = hf
    chat = _write(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    assert _cli("sharegpt", "--input", str(chat), "--tokenizer", "builtin", "--out", str(tmp_path / "x")) == 2
    err = _error_line(capsys)
    assert "--tokenizer builtin has no chat template" in err and "--prompt-template alpaca" in err
    nochat = _hf_dir(tmp_path / "nochat", None)
    assert _cli("pairwise", "--input", str(chat), "--tokenizer", str(nochat), "--out", str(tmp_path / "x")) == 2
    assert f"--tokenizer {nochat} has no chat template" in _error_line(capsys)
    assert _cli("sharegpt", "--input", str(chat), "--tokenizer", "builtin", "--out", str(tmp_path / "x"),
                "--prompt-template", "alpaca") == 0
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    assert _cli("alpaca", "--input", str(empty), "--tokenizer", str(path), "--out", str(tmp_path / "y")) == 2
    assert "e.jsonl: the file holds no records" in _error_line(capsys)
    assert _cli("alpaca", "--input", str(chat), "--tokenizer", str(path), "--out", str(tmp_path / "y"), "--pack") == 2
    assert "--pack needs --seq-len" in _error_line(capsys)
    assert not list(tmp_path.glob("y*"))


def test_unstable_template_is_skipped(tmp_path: Path, capsys) -> None:
    bad = _hf_dir(tmp_path / "bad", UNSTABLE_TEMPLATE)
    src = _write(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}])
    assert _cli("alpaca", "--input", str(src), "--tokenizer", str(bad), "--out", str(tmp_path / "u")) == 2
    assert "unstable_template=1" in _error_line(capsys) and not list(tmp_path.glob("u_*"))
    assert _cli("alpaca", "--input", str(src), "--tokenizer", str(bad), "--out", str(tmp_path / "u"), "--strict") == 2
    assert f"{src}:1: chat template is not prefix-stable" in _error_line(capsys)


def test_workers_byte_identical(hf, tmp_path: Path, capsys) -> None:
    path, _ = hf
    records = [{"prompt": f"Hello {i}", "chosen": "fine " * (i % 4 + 1), "rejected": "fox"} for i in range(300)]
    records[17] = "{broken"
    src = _write(tmp_path / "p.jsonl", records)
    for w in ("1", "2"):
        assert _cli("pairwise", "--input", str(src), "--tokenizer", str(path), "--out", str(tmp_path / f"w{w}"),
                    "--workers", w) == 0
    out = capsys.readouterr().out
    assert "299 samples" in out and "invalid_json=1" in out and "p.jsonl:18:" in out and "tokens/s" in out
    names = sorted(p.name[2:] for p in tmp_path.glob("w1_*"))
    assert len(names) == 9  # 4 datasets x (.bin, .idx) + meta
    for name in names:
        assert (tmp_path / f"w1{name}").read_bytes() == (tmp_path / f"w2{name}").read_bytes(), name


def test_parquet_without_pyarrow_is_a_clear_error(hf, tmp_path: Path, monkeypatch, capsys) -> None:
    path, _ = hf
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    src = tmp_path / "d.parquet"
    src.write_bytes(b"PAR1")
    assert _cli("alpaca", "--input", str(src), "--tokenizer", str(path), "--out", str(tmp_path / "q")) == 2
    assert "needs pyarrow" in _error_line(capsys)


def test_parquet_input(hf, tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow", reason="pyarrow is an optional dependency (parquet input)")
    import pyarrow.parquet as pq

    path, _ = hf
    rows = [{"instruction": "Hello", "input": "", "output": "world"}, {"instruction": "quick", "input": None, "output": "fox"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    _write(tmp_path / "d.jsonl", rows)
    for name in ("d.parquet", "d.jsonl"):
        _run(tmp_path, name, kind="alpaca", inputs=[tmp_path / name], tokenizer=str(path))
    assert _samples(tmp_path / "d.parquet") == _samples(tmp_path / "d.jsonl")
