"""`--model org/name`: Hub ids resolve through huggingface_hub's local cache (models/hub.py); offline mode is
respected with a one-line error; presets and local paths are untouched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from graphllm.errors import GraphllmError
from graphllm.models import load_config, load_model
from graphllm.models.hub import is_hub_id, resolve_model
from graphllm.plan import CompilePlan
from hf_parity import hf_model, save_hf_checkpoint

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hugging Face cache holding acme/tiny-llama (a tiny random llama) in the Hub's own layout."""
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-llama"
    save_hf_checkpoint(hf_model("llama", "sdpa"), "llama", repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_a_cached_hub_id_loads_like_its_directory(hub_cache: Path) -> None:
    snapshot = hub_cache / "models--acme--tiny-llama" / "snapshots" / REVISION
    assert Path(resolve_model("acme/tiny-llama")) == snapshot
    assert load_config("acme/tiny-llama") == load_config(snapshot)
    by_id, by_dir = load_model("acme/tiny-llama").state_dict(), load_model(snapshot).state_dict()
    assert by_id.keys() == by_dir.keys() and all(torch.equal(by_id[k], by_dir[k]) for k in by_id)
    assert Path(CompilePlan(model="acme/tiny-llama").model) == snapshot  # the artifact records the snapshot


def test_presets_and_paths_are_not_hub_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_model("tiny-llama", ("tiny-llama",)) == "tiny-llama"
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # a relative org/name that exists is a path, not an id
    assert not is_hub_id("org/name") and is_hub_id("other/name")
    assert not is_hub_id("/abs/path") and not is_hub_id("a/b/c") and not is_hub_id("../x")


def test_offline_and_not_cached_is_one_line_exit_2(hub_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(GraphllmError, match=r"acme/absent is not in the Hugging Face cache at .* offline mode is on"):
        load_config("acme/absent")
    out = tmp_path / "art"
    env = dict(os.environ, HF_HUB_CACHE=str(hub_cache), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "graphllm", "compile", "--model", "acme/absent", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "acme/absent is not in the Hugging Face cache" in proc.stderr and "hf download acme/absent" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()
