"""The compiled kernels an artifact carries (graphllm/compile_cache.py): stored per rank at `graphllm compile`,
loaded by `graphllm run` into an empty inductor cache with bitwise the same step, and every way the blob cannot
be used (another key, truncated, altered, absent, switched off) giving one line and a normal compile.

Reproduce: pytest tests/test_compile_cache.py -x -q
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import zipfile
from types import SimpleNamespace

import pytest
import torch

from graphllm import compile_cache
from graphllm.compile_cache import MAGIC, rank_file
from graphllm.job import _load_compile_cache, compile_artifact, example_batch, load_artifact

REPRO = "pytest tests/test_compile_cache.py -x -q"


def _step(built) -> tuple[float, list[torch.Tensor]]:
    """Loss and gradients of one forward/backward on a fixed random batch, shaped as the data feed gives it:
    input ids and labels are views of one [batch, seq + 1] tensor (the labels' row stride is seq + 1)."""
    g = torch.Generator().manual_seed(0)
    ids, _ = example_batch(built.plan)
    tokens = torch.randint(0, built.model.config.vocab_size, (ids.shape[0], ids.shape[1] + 1), generator=g)
    loss = built.engine.forward_backward(tokens[:, :-1], tokens[:, 1:])
    grads = [p.grad.clone() for p in built.engine.params]
    for p in built.engine.params:
        p.grad = None
    return loss, grads


@pytest.fixture(scope="module")
def inductor_art(tmp_path_factory):
    """tiny-llama on inductor, batch 1 × 16, compiled once: (artifact, the compiled step's loss and grads)."""
    from graphllm.plan import CompilePlan

    out = tmp_path_factory.mktemp("cc") / "tiny"
    built, _ = compile_artifact(CompilePlan(model="tiny-llama", backend="inductor", batch_size=1, seq_len=16), out)
    return out, *_step(built)


def _split(blob: bytes) -> tuple[dict, bytes]:
    line, _, payload = blob[len(MAGIC):].partition(b"\n")
    return json.loads(line), payload


def _cache_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "graphllm" and r.levelno >= logging.WARNING]


def test_artifact_carries_cache_per_rank(inductor_art):
    art = inductor_art[0]
    header, _ = _split(rank_file(art, 0).read_bytes())
    plan = json.loads((art / "plan.json").read_text())
    assert header["key"] == compile_cache.cache_key(plan["graph_hash"]["rank0"]), REPRO
    assert header["graphs"] >= 2 and header["libraries"] >= 1, (header, REPRO)  # forward + backward, their kernels


def test_loaded_cache_compiles_nothing_and_steps_bitwise(inductor_art, tmp_path, caplog):
    art, loss, grads = inductor_art
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache

    counters.clear()
    with caplog.at_level(logging.INFO, logger="graphllm"), fresh_cache(dir=str(tmp_path), delete=False):
        cache = compile_cache.inductor_cache_dir()  # empty, and torch's in-memory caches cleared
        _, built = load_artifact(art, use_compile_cache=True)
        libs = {p.relative_to(cache).as_posix() for p in cache.glob("*/*.so")}
    assert not _cache_lines(caplog), _cache_lines(caplog)
    assert counters["inductor"]["fxgraph_cache_hit"] >= 2 and not counters["inductor"]["fxgraph_cache_miss"], \
        (dict(counters["inductor"]), REPRO)
    names = zipfile.ZipFile(io.BytesIO(_split(rank_file(art, 0).read_bytes())[1])).namelist()
    stored = {n.removeprefix("libs/") for n in names if n.startswith("libs/")}
    assert libs == stored, (f"compiled C++ beside the stored libraries: {sorted(libs - stored)}", REPRO)
    got_loss, got_grads = _step(built)
    assert got_loss == loss and all(torch.equal(a, b) for a, b in zip(got_grads, grads)), (got_loss, loss, REPRO)
    # the feed's strided labels reuse the graph compiled for dense inputs (no second compile at the first step)
    assert built.compiled.compile_counts == {"forward": 1, "backward": 1}, (built.compiled.compile_counts, REPRO)


def test_other_isa_one_line_then_compiles(inductor_art, tmp_path, caplog):
    """A cache for another instruction set: one line naming the key, then the normal compile, same step.
    (Every reason to fall back — another key, a damaged or missing blob — takes this same path: `load` returns
    the line before touching the local cache; the tests below check each reason without compiling.)"""
    art, loss, grads = inductor_art
    mine = tmp_path / "art"
    shutil.copytree(art, mine)
    path = rank_file(mine, 0)
    header, payload = _split(path.read_bytes())
    header["key"]["isa"] = "x86_64 SOMETHING_ELSE"
    path.write_bytes(MAGIC + json.dumps(header).encode() + b"\n" + payload)
    with caplog.at_level(logging.WARNING, logger="graphllm"):
        _, built = load_artifact(mine, use_compile_cache=True)
    lines = _cache_lines(caplog)
    assert len(lines) == 1 and lines[0].startswith("rank0: compile cache is for another isa"), (lines, REPRO)
    got_loss, got_grads = _step(built)
    assert got_loss == loss and all(torch.equal(a, b) for a, b in zip(got_grads, grads)), (got_loss, loss, REPRO)


@pytest.mark.parametrize("cut", [0, len(MAGIC) + 5, -1, "flip"])
def test_damaged_blob_writes_nothing(inductor_art, tmp_path, monkeypatch, cut):
    blob = rank_file(inductor_art[0], 0).read_bytes()
    header, _ = _split(blob)
    if cut == "flip":
        bad = bytearray(blob)
        bad[-100] ^= 0xFF  # inside the payload: the header's checksum catches it
        bad = bytes(bad)
    else:
        bad = blob[:cut]
    (tmp_path / "rank0.bin").write_bytes(bad)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    why = compile_cache.load(tmp_path / "rank0.bin", header["key"], what="rank0")
    assert why is not None and "damaged" in why, (why, REPRO)
    assert not any((tmp_path / "inductor").rglob("*")), "a damaged blob wrote into the inductor cache"


def _stub(rank: int, graph: str):
    return SimpleNamespace(plan=SimpleNamespace(backend="inductor"), rank=rank, timings={},
                           result=SimpleNamespace(model_graph_hash=graph))


def test_each_rank_reads_its_own_blob(inductor_art, tmp_path, monkeypatch, caplog):
    art = tmp_path / "art"
    (art / compile_cache.CACHE_DIR).mkdir(parents=True)
    blob = rank_file(inductor_art[0], 0).read_bytes()
    graph = _split(blob)[0]["key"]["graph"]
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.delenv(compile_cache.DISABLE_ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger="graphllm"):
        assert _load_compile_cache(art, _stub(1, graph), None) == "fallback"  # no rank1.bin
        assert "rank1: no compile cache" in _cache_lines(caplog)[-1], REPRO
        rank_file(art, 1).write_bytes(blob)  # rank 0's blob where rank 1's belongs: another graph on rank 1
        assert _load_compile_cache(art, _stub(1, "0123456789abcdef"), None) == "fallback"
        assert "rank1: compile cache is for another graph" in _cache_lines(caplog)[-1], REPRO
        assert _load_compile_cache(art, _stub(1, graph), None) == "loaded", REPRO
        rank_file(art, 1).write_bytes(blob[:-1])  # truncated by one byte
        assert _load_compile_cache(art, _stub(1, graph), None) == "fallback"
        assert "rank1: compile cache" in _cache_lines(caplog)[-1] and "damaged" in _cache_lines(caplog)[-1], REPRO
        monkeypatch.setenv(compile_cache.DISABLE_ENV, "1")
        assert _load_compile_cache(art, _stub(1, graph), None) == "off", REPRO
    assert len(_cache_lines(caplog)) == 3, _cache_lines(caplog)
    assert any((tmp_path / "inductor").glob("*/*.so")), "the loaded blob's libraries are not in the cache"
