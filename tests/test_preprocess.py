"""`graphllm preprocess pretrain`: malformed-record accounting, exact token round trip, determinism
across worker counts, strict mode, atomic outputs, the meta file, JSON-array and parquet input, and the
three tokenizer kinds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from graphllm.cli.main import main

from graphllm.data.indexed import IndexedReader
from graphllm.data.preprocess import PretrainConfig, preprocess_pretrain
from graphllm.data.tokenizer import builtin_tokenizer

GOOD = ["Hello world.", "def f(x):\n    return x + 1", "The quick brown fox.", "ünïcode ✓ text"]


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()  # the default cache, shared with test_data.py: trained once per machine


@pytest.fixture
def jsonl(tmp_path: Path) -> Path:
    lines = [json.dumps({"text": GOOD[0]}),          # 1
             "{not json",                              # 2 invalid_json
             json.dumps({"body": "no text key"}),      # 3 missing_key
             json.dumps({"text": GOOD[1], "id": 7}),   # 4
             "",                                       # 5 blank: ignored
             json.dumps({"text": ""}),                 # 6 empty_text
             json.dumps({"text": 12}),                 # 7 not_string
             json.dumps({"text": GOOD[2]}),            # 8
             json.dumps({"text": GOOD[3]})]            # 9
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _cli(*argv: str) -> int:
    return main(["preprocess", "pretrain", *argv])


def _docs(prefix: Path) -> list[list[int]]:
    r = IndexedReader(prefix)
    assert len(r) == r.num_documents  # one sequence per document
    return [r[i].tolist() for i in range(len(r))]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_counts_lines_and_round_trip(tok, jsonl: Path, tmp_path: Path) -> None:
    s = preprocess_pretrain(PretrainConfig(inputs=[jsonl], tokenizer=str(tok.path), out=tmp_path / "o"))
    assert s.documents == 4
    assert s.skipped == {"invalid_json": 1, "missing_key": 1, "empty_text": 1, "not_string": 1}
    assert [(Path(f).name, no) for f, no, _ in s.bad_lines] == [("docs.jsonl", n) for n in (2, 3, 6, 7)]
    want = [tok.encode(t) + [tok.eos_id] for t in GOOD]
    assert _docs(tmp_path / "o") == want
    assert s.tokens == sum(map(len, want))


def test_cli_workers_identical_and_no_eod(tok, jsonl: Path, tmp_path: Path, capsys) -> None:
    assert _cli("--input", str(jsonl), "--tokenizer", "builtin", "--out", str(tmp_path / "w1")) == 0
    out = capsys.readouterr().out
    assert "4 documents" in out and "invalid_json=1" in out and "docs.jsonl:2:" in out
    assert _cli("--input", str(jsonl), str(jsonl), "--tokenizer", "builtin", "--out", str(tmp_path / "w2"),
                "--workers", "2") == 0
    assert _cli("--input", str(jsonl), str(jsonl), "--tokenizer", "builtin", "--out", str(tmp_path / "w1b")) == 0
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w2{ext}").read_bytes() == (tmp_path / f"w1b{ext}").read_bytes()
    assert _cli("--input", str(jsonl), "--tokenizer", "builtin", "--out", str(tmp_path / "ne"), "--no-eod") == 0
    assert _docs(tmp_path / "ne") == [tok.encode(t) for t in GOOD]


def test_strict_names_file_line_and_writes_nothing(tok, jsonl: Path, tmp_path: Path, capsys) -> None:
    assert _cli("--input", str(jsonl), "--tokenizer", "builtin", "--out", str(tmp_path / "s"), "--strict") == 2
    assert f"{jsonl}:2: invalid JSON" in _error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]  # no outputs, no temp files


def test_failed_run_leaves_existing_outputs(tok, jsonl: Path, tmp_path: Path, capsys) -> None:
    prefix = tmp_path / "keep"
    assert _cli("--input", str(jsonl), "--tokenizer", "builtin", "--out", str(prefix)) == 0
    before = {ext: (tmp_path / f"keep{ext}").read_bytes() for ext in (".bin", ".idx", "_meta.json")}
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": None}) + "\n")
    assert _cli("--input", str(other), "--tokenizer", "builtin", "--out", str(prefix), "--strict") == 2
    assert f"{other}:2:" in _error_line(capsys)
    assert {ext: (tmp_path / f"keep{ext}").read_bytes() for ext in before} == before
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("argv, needle", [
    (["--input", "MISSING.jsonl", "--tokenizer", "builtin"], "MISSING.jsonl: no such file"),
    (["--input", "GOOD", "--tokenizer", "nope.model"], "--tokenizer nope.model"),
    (["--input", "GOOD", "--tokenizer", "builtin", "--workers", "0"], "--workers"),
    (["--input", "EMPTY", "--tokenizer", "builtin"], "empty.jsonl: the file holds no records"),
    (["--input", "BAD", "--tokenizer", "builtin"], "every record was malformed"),
])
def test_user_errors_are_one_line(tok, jsonl: Path, tmp_path: Path, capsys, argv, needle) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n')
    argv = [{"GOOD": str(jsonl), "EMPTY": str(tmp_path / "empty.jsonl"), "BAD": str(tmp_path / "bad.jsonl")}.get(a, a)
            for a in argv]
    assert _cli(*argv, "--out", str(tmp_path / "x")) == 2
    assert needle in _error_line(capsys)
    assert not list(tmp_path.glob("x.*"))


def test_text_paragraphs(tok, tmp_path: Path) -> None:
    txt = tmp_path / "book.txt"
    txt.write_text("First para\nline two.\n\n\n  \nSecond para.\n\nThird\n", encoding="utf-8")
    s = preprocess_pretrain(PretrainConfig(inputs=[txt], tokenizer="builtin", out=tmp_path / "t"))
    assert s.documents == 3 and not s.skipped
    paras = ["First para\nline two.", "Second para.", "Third"]
    assert _docs(tmp_path / "t") == [tok.encode(p) + [tok.eos_id] for p in paras]


def test_hf_tokenizer_directory(jsonl: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = sorted({w for t in GOOD for w in t.split()})
    vocab = {w: i for i, w in enumerate(["[UNK]", "</s>", *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_dir = tmp_path / "hf"
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>").save_pretrained(hf_dir)

    s = preprocess_pretrain(PretrainConfig(inputs=[jsonl], tokenizer=str(hf_dir), out=tmp_path / "h", workers=2))
    assert s.documents == 4
    hf = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    assert _docs(tmp_path / "h") == [hf.encode(t, add_special_tokens=False) + [1] for t in GOOD]


def test_meta_file_and_json_array(tok, tmp_path: Path) -> None:
    arr = tmp_path / "docs.json"
    arr.write_text(json.dumps([{"text": t} for t in GOOD[:2]] + [{"body": 1}], indent=1), encoding="utf-8-sig")  # BOM
    s = preprocess_pretrain(PretrainConfig(inputs=[arr], tokenizer="builtin", out=tmp_path / "m"))
    assert _docs(tmp_path / "m") == [tok.encode(t) + [tok.eos_id] for t in GOOD[:2]]
    assert [(no, detail) for _, no, detail in s.bad_lines] == [(8, "missing key 'text'")]  # the element's first line
    meta = json.loads((tmp_path / "m_meta.json").read_text())
    assert {k: meta[k] for k in ("kind", "tokenizer", "packed", "seq_len", "documents", "samples", "tokens")} == {
        "kind": "pretrain", "tokenizer": "builtin", "packed": False, "seq_len": None, "documents": 2, "samples": 2,
        "tokens": s.tokens}
    assert s.outputs[-1].endswith("m_meta.json")  # written last


def test_parquet_input(tok, jsonl: Path, tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow", reason="pyarrow is an optional dependency (parquet input)")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"text": t, "n": i} for i, t in enumerate(GOOD)] + [{"text": None, "n": 9}]),
                   tmp_path / "d.parquet")
    s = preprocess_pretrain(PretrainConfig(inputs=[tmp_path / "d.parquet"], tokenizer="builtin", out=tmp_path / "p"))
    assert _docs(tmp_path / "p") == [tok.encode(t) + [tok.eos_id] for t in GOOD]
    assert s.skipped == {"not_string": 1} and s.bad_lines[0][1] == 5  # parquet rows count from 1


# -- a full disk --------------------------------------------------------------------------------------------
class FullDisk:
    """`os.fdopen(fd, "wb")` on a disk with `free` bytes left: the raw write past them raises ENOSPC, under
    the usual buffered writer (which keeps what did not fit and tries again on close, as a real full disk
    makes it do)."""

    def __init__(self, free: int) -> None:
        import os

        self.free, self._fdopen = free, os.fdopen

    def fdopen(self, fd, mode="r", *args, **kwargs):
        import errno
        import io

        if "w" not in mode:
            return self._fdopen(fd, mode, *args, **kwargs)
        disk = self

        class Raw(io.FileIO):
            def write(self, b) -> int:
                n = memoryview(b).nbytes
                if n > disk.free:
                    disk.free = 0
                    raise OSError(errno.ENOSPC, "No space left on device")
                disk.free -= n
                return super().write(b)

        return io.BufferedWriter(Raw(fd, "wb"))


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> dict:
    """~1 MB of built-in corpus text as jsonl, and the files a complete run writes from it."""
    from graphllm.data.corpus import builtin_documents

    root = tmp_path_factory.mktemp("big")
    docs, size = [], 0
    for doc in builtin_documents()[2000:]:
        docs.append(json.dumps({"text": doc}) + "\n")
        size += len(docs[-1])
        if size > 1_000_000:
            break
    src = root / "big.jsonl"
    src.write_text("".join(docs))
    assert _cli("--input", str(src), "--tokenizer", "builtin", "--out", str(root / "ref")) == 0
    files = [root / f"ref{ext}" for ext in (".bin", ".idx", "_meta.json")]
    return {"input": src, "bytes": {f.name[3:]: f.stat().st_size for f in files}}


def _needed_mb(err: str) -> float:
    import re

    found = re.search(r"\(needed about ([0-9.]+) MB\)", err)
    assert found, err
    return float(found.group(1))


@pytest.mark.parametrize("where", ["streaming", "finishing"])
def test_disk_full_is_one_line_leaves_nothing_and_estimates_the_need(tok, jsonl, big, tmp_path, capsys, monkeypatch,
                                                                      where) -> None:
    import os

    prefix = tmp_path / "keep"
    assert _cli("--input", str(jsonl), "--tokenizer", "builtin", "--out", str(prefix)) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    need = sum(big["bytes"].values())
    # streaming: the disk fills a third of the way through the tokens; finishing: every dataset byte fits, the
    # meta file does not (the last write, after .bin and .idx are complete under their temp names)
    free = need // 3 if where == "streaming" else big["bytes"][".bin"] + big["bytes"][".idx"] + 10
    monkeypatch.setattr(os, "fdopen", FullDisk(free).fdopen)
    capsys.readouterr()
    assert _cli("--input", str(big["input"]), "--tokenizer", "builtin", "--out", str(prefix)) == 2
    err = _error_line(capsys)
    assert f"error: no space left on device at {tmp_path} (needed about " in err and "another --out" in err
    assert 0.7 * need / 1e6 <= _needed_mb(err) <= 1.4 * need / 1e6, (err, need)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp file; old outputs as they were


def test_disk_full_on_a_real_tmpfs(tok, jsonl, big, tmp_path, capsys) -> None:
    import os
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        assert _cli("--input", str(jsonl), "--tokenizer", "builtin", "--out", str(mnt / "keep")) == 0
        before = {p.name: p.read_bytes() for p in mnt.iterdir()}
        capsys.readouterr()
        assert _cli("--input", str(big["input"]), "--tokenizer", "builtin", "--out", str(mnt / "keep")) == 2
        err = _error_line(capsys)
        assert f"error: no space left on device at {mnt} (needed about " in err
        need = sum(big["bytes"].values())
        assert 0.7 * need / 1e6 <= _needed_mb(err) <= 1.4 * need / 1e6, (err, need)
        assert {p.name: p.read_bytes() for p in mnt.iterdir()} == before
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


WORKER_STUCK = """
import signal, sys, time
from pathlib import Path
from graphllm.data.records import SkipLog, map_records

class Job:  # record "slow" keeps its worker busy; the others are instant
    def setup(self):
        pass

    def run(self, kind, payload):
        if b"slow" in payload:
            time.sleep(600)
        return payload

signal.signal(signal.SIGTERM, lambda *a: None)  # like a training loop's handler: only notes the signal
for result in map_records(Job(), [Path(sys.argv[1])], workers=2, log=SkipLog()):
    break  # the run stops early (a full disk, --strict) while the other worker is busy: terminate the pool
print("stopped")
"""


def test_workers_end_when_the_parent_handles_sigterm(tmp_path: Path) -> None:
    """Pool workers inherit the parent's Python-level SIGTERM handler (the CLI installs one; a training loop's
    only sets a flag): a run that stops early must still end a busy worker with `Pool.terminate()`, or the
    parent waits in join() forever."""
    import os
    import signal
    import subprocess
    import sys

    from graphllm.data.records import CHUNKSIZE

    src = tmp_path / "r.jsonl"
    src.write_text("".join(json.dumps({"text": "fast"}) + "\n" for _ in range(CHUNKSIZE)) + '{"text": "slow"}\n')
    proc = subprocess.Popen([sys.executable, "-c", WORKER_STUCK, str(src)], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its stuck worker
        proc.communicate()
        pytest.fail("the run hung: its busy worker outlived Pool.terminate()'s SIGTERM")
    assert proc.returncode == 0 and out.strip() == "stopped", err
