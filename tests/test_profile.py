"""`graphllm profile`: a real profile of a compiled step, with its trace and summary on disk."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from graphllm.cli.main import main

    root = tmp_path_factory.mktemp("prof")
    common = ["--model", "tiny-llama", "--backend", "eager", "--seq-len", "32", "--batch-size", "2"]
    assert main(["compile", *common, "--out", str(root / "one")]) == 0
    assert main(["compile", *common, "--tp", "2", "--out", str(root / "tp2")]) == 0
    return root


def test_profile_writes_trace_and_summary(artifacts):
    from graphllm.cli.main import main

    art = artifacts / "one"
    assert main(["profile", str(art), "--steps", "2", "--warmup", "1"]) == 0
    s = json.loads((art / "profile" / "summary_rank0.json").read_text())
    assert len(s["step_times_s"]) == 2 and s["median_step_s"] > 0
    assert 0 < s["mfu"] < 1
    mm = [r for r in s["top_ops"] if r["op"] == "aten::mm"]
    assert mm and mm[0]["flops"] > 0 and mm[0]["flop_per_s"] > 0
    assert {"fuse_attention", "capture"} <= set(s["by_origin_s"])
    assert s["communication_s"] == 0  # one process: no collectives
    trace = json.loads((art / "profile" / "trace_rank0.json").read_text())
    assert any(ev.get("name") == "aten::mm" for ev in trace["traceEvents"])


def test_profile_by_layer(artifacts):
    from graphllm.cli.main import main

    art = artifacts / "one"
    assert main(["profile", str(art), "--steps", "1", "--warmup", "1", "--by-layer", "--out", str(art / "p2")]) == 0
    s = json.loads((art / "p2" / "summary_rank0.json").read_text())
    layers = s["by_layer_s"]
    # tiny-llama: embedding, 4 decoder layers, final norm, LM head; each layer ran forward and backward
    assert [f"model.layers.{i}" for i in range(4)] == [m for m in layers if ".layers." in m]
    assert {"model.embed_tokens", "model.norm", "lm_head"} <= set(layers)
    assert all(layers[f"model.layers.{i}"]["forward"] > 0 and layers[f"model.layers.{i}"]["backward"] > 0
               for i in range(4))
    assert sum(t["forward"] + t["backward"] for t in layers.values()) <= s["self_time_s"]


def test_profile_of_tensor_parallel_ranks_sees_communication(artifacts):
    from graphllm.cli.main import main

    art = artifacts / "tp2"
    assert main(["profile", str(art), "--steps", "1", "--warmup", "1"]) == 0
    for rank in (0, 1):
        s = json.loads((art / "profile" / f"summary_rank{rank}.json").read_text())
        assert s["communication_s"] > 0
        assert s["exposed_communication_s"] <= s["communication_s"]
        assert "tensor_parallel" in s["by_origin_s"]


def test_profile_refuses_bad_steps(artifacts, capsys):
    from graphllm.cli.main import main

    assert main(["profile", str(artifacts / "one"), "--steps", "0"]) == 2
    assert "--steps must be ≥ 1" in capsys.readouterr().err
