"""`graphllm profile`: a real profile of a compiled step, with its trace and summary on disk."""

from __future__ import annotations

import json

import pytest
import torch

SUM_TOL_S = 1e-9
"""Slack on sums of the profiler's per-event times (microsecond floats): rounding only. Every figure is a
sum of self times inside the step's own range on the profiler's one clock, so no clock tolerance is needed."""
FUSED_PASSES = {"fuse_rms_norm", "fuse_add_rms_norm", "fuse_swiglu", "fuse_rope", "fuse_attention"}
"""tiny-llama's model passes that replace ops by graphllm ops (fold_constants only folds)."""


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from graphllm.cli.main import main

    root = tmp_path_factory.mktemp("prof")
    common = ["--model", "tiny-llama", "--backend", "eager", "--seq-len", "32", "--batch-size", "2"]
    assert main(["compile", *common, "--out", str(root / "one")]) == 0
    assert main(["compile", *common, "--tp", "2", "--out", str(root / "tp2")]) == 0
    return root


@pytest.fixture(scope="module")
def inductor_artifact(tmp_path_factory):
    from graphllm.cli.main import main

    out = tmp_path_factory.mktemp("prof_inductor") / "art"
    assert main(["compile", "--model", "tiny-llama", "--backend", "inductor", "--seq-len", "32", "--batch-size", "2",
                 "--out", str(out)]) == 0
    return out


def assert_steps_add_up(s: dict, command: str) -> None:
    """compute + communication + no op = the step, exposed ⊆ communication, for every profiled step; the
    per-step compute is the median step's own, so it cannot exceed the median step; the by-origin table
    adds up to the profiled steps' wall time."""
    for i, r in enumerate(s["per_step"]):
        parts = r["compute_s"] + r["communication_s"] + r["no_op_s"]
        assert abs(parts - r["step_s"]) <= SUM_TOL_S, f"step {i}: parts {parts} != step {r['step_s']}; {command}"
        assert r["compute_s"] + r["exposed_communication_s"] <= r["step_s"] + SUM_TOL_S, f"step {i}: {r}; {command}"
        assert 0 <= r["exposed_communication_s"] <= r["communication_s"] + SUM_TOL_S, f"step {i}: {r}; {command}"
    m = s["median_step"]
    assert m in s["per_step"], f"the median step's figures are not those of a step that ran; {command}"
    assert m["step_s"] == s["median_step_s"] == sorted(s["step_times_s"])[(len(s["step_times_s"]) - 1) // 2]
    assert m["compute_s"] + m["exposed_communication_s"] <= s["median_step_s"] + SUM_TOL_S, command
    assert abs(sum(s["by_origin_s"].values()) - s["profiled_s"]) <= 1e-6, command  # one float sum per event


def test_profile_writes_trace_and_summary(artifacts, capfd):
    from graphllm.cli.main import main

    art = artifacts / "one"
    assert main(["profile", str(art), "--steps", "2", "--warmup", "1"]) == 0
    err = capfd.readouterr().err
    assert "USDT:" not in err and "STAGE:" not in err, err  # kineto's profiler_start/stop lines are dropped
    assert "median step" in err and "exposed" in err and "no op" in err  # each figure named in the output
    s = json.loads((art / "profile" / "summary_rank0.json").read_text())
    assert len(s["step_times_s"]) == 2 and s["median_step_s"] > 0
    assert 0 < s["mfu"] < 1
    mm = [r for r in s["top_ops"] if r["op"] == "aten::mm"]
    assert mm and mm[0]["flops"] > 0 and mm[0]["flop_per_s"] > 0
    assert {"fuse_attention", "capture"} <= set(s["by_origin_s"])
    assert s["communication_s"] == 0  # one process: no collectives
    assert set(s["figures"]) == set(s["median_step"])
    trace = json.loads((art / "profile" / "trace_rank0.json").read_text())
    assert any(ev.get("name") == "aten::mm" for ev in trace["traceEvents"])


def test_profile_by_layer(artifacts):
    from graphllm.cli.main import main

    art = artifacts / "one"
    argv = ["profile", str(art), "--steps", "3", "--warmup", "1", "--by-layer", "--out", str(art / "p2")]
    assert main(argv) == 0
    s = json.loads((art / "p2" / "summary_rank0.json").read_text())
    assert_steps_add_up(s, "graphllm " + " ".join(argv))
    layers = s["by_layer_s"]
    # tiny-llama: embedding, 4 decoder layers, final norm, LM head; each layer ran forward and backward
    assert [f"model.layers.{i}" for i in range(4)] == [m for m in layers if ".layers." in m]
    assert {"model.embed_tokens", "model.norm", "lm_head"} <= set(layers)
    assert all(layers[f"model.layers.{i}"]["forward"] > 0 and layers[f"model.layers.{i}"]["backward"] > 0
               for i in range(4))
    assert sum(t["forward"] + t["backward"] for t in layers.values()) <= s["self_time_s"]


def test_uneven_steps_report_the_median_steps_own_parts():
    """A slow step among fast ones: the total compute over the steps divided by their number (the figure the
    profile used to print) exceeds the median step; the median step's own compute does not."""
    from graphllm.profile import profile_steps, summarize

    x = torch.randn(256, 256)
    # matmul rounds per step: the second step is slow, 30× the others, so that the test still holds when another
    # process (a second pytest worker) slows the fast steps several-fold
    work = iter([1, 30, 1])

    def one_step():
        for _ in range(20 * next(work)):
            x @ x

    s = summarize(profile_steps(one_step, 3), flops_per_step=1, peak=1.0, origins={}, top=5)
    rows, median = s["per_step"], s["median_step"]
    assert len(rows) == 3 and median == sorted(rows, key=lambda r: r["step_s"])[1]
    assert s["compute_s"] / 3 > s["median_step_s"]  # the figure the profile used to print: larger than the step
    assert median["compute_s"] <= s["median_step_s"] + SUM_TOL_S
    assert all(abs(r["compute_s"] + r["no_op_s"] - r["step_s"]) <= SUM_TOL_S for r in rows)


def test_kernel_names_split_into_node_names():
    from graphllm.profile import is_communication
    from graphllm.profile_kernels import KERNEL, split_names

    name = "graph_0_cpp_fused__scaled_dot_product_flash_attention_for_cpu_backward_view_89_all_reduce_2_mul_4"
    nodes = KERNEL.match(name).group("nodes")
    known = {"_scaled_dot_product_flash_attention_for_cpu_backward", "view_89", "view", "mul", "all_reduce_2"}
    assert split_names(nodes, known) == ["_scaled_dot_product_flash_attention_for_cpu_backward", "view_89",
                                         "all_reduce_2", "mul"]
    assert split_names("add_10_mean_3", {"add"}) == ["add"]  # unknown tokens are skipped
    assert not is_communication(name)  # a kernel fusing a node named all_reduce_2 is not a collective
    assert KERNEL.match("aten::mm") is None


def test_profile_of_inductor_attributes_fused_kernels_to_passes(inductor_artifact, capfd):
    from graphllm.cli.main import main

    argv = ["profile", str(inductor_artifact), "--steps", "2", "--warmup", "1"]
    assert main(argv) == 0
    assert "USDT:" not in capfd.readouterr().err
    s = json.loads((inductor_artifact / "profile" / "summary_rank0.json").read_text())
    command = "graphllm " + " ".join(argv)
    assert_steps_add_up(s, command)
    origins = s["by_origin_s"]
    assert FUSED_PASSES | {"capture"} <= {k for k, t in origins.items() if t > 0}, f"{origins}; {command}"
    assert "inductor (fused)" not in origins, command  # every kernel named after its nodes
    assert origins.get("inductor (unattributed)", 0) <= 0.01 * s["profiled_s"], f"{origins}; {command}"
    kernels = s["inductor_kernels"]
    assert any(k.startswith("forward:") for k in kernels) and any(k.startswith("backward:") for k in kernels)
    rope = [counts for k, counts in kernels.items() if counts.get("fuse_rope", 0) > counts.get("capture", 0)]
    assert rope, f"no kernel mostly made of fuse_rope's nodes: {kernels}"


def test_profile_of_tensor_parallel_ranks_sees_communication(artifacts):
    from graphllm.cli.main import main

    art = artifacts / "tp2"
    assert main(["profile", str(art), "--steps", "1", "--warmup", "1"]) == 0
    for rank in (0, 1):
        s = json.loads((art / "profile" / f"summary_rank{rank}.json").read_text())
        assert s["communication_s"] > 0
        assert s["exposed_communication_s"] <= s["communication_s"]
        assert "tensor_parallel" in s["by_origin_s"]
        assert_steps_add_up(s, f"graphllm profile {art} --steps 1 --warmup 1")


def test_profile_refuses_bad_steps(artifacts, capsys):
    from graphllm.cli.main import main

    assert main(["profile", str(artifacts / "one"), "--steps", "0"]) == 2
    assert "--steps must be ≥ 1" in capsys.readouterr().err
