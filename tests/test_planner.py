"""`graphllm plan` and graphllm.planner: enumeration, predictions against graphllm's own compile report, a
Llama-2-70B plan that allocates no weights, bad input (exit 2, one line), and `--emit` parsed by `graphllm
compile`'s own parser."""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys

import pytest

from graphllm.cli.main import EXIT_USER_ERROR, build_parser, command_parser, main
from graphllm.models import load_config
from graphllm.planner.devices import DEVICES, device_spec, parse_bytes
from graphllm.planner.search import Space, enumerate_layouts

TINY_FAST = ["--model", "tiny-llama", "--seq-len", "128", "--tp", "1,2", "--cp", "1", "--recompute", "none",
             "--micro-batch-sizes", "1,2", "--no-cache", "--jobs", "1"]
"""One graph measurement per tp size (tp 1 and 2, recompute none, one row of 128 tokens)."""


PEAK_RSS_OF_MAIN = """
import resource, sys
from graphllm.cli.main import main
code = main(sys.argv[1:])
peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
print("peak-rss-kib", peak, file=sys.stderr)
sys.exit(code)
"""
"""`graphllm ARGS` in a child that reports its own peak RSS and its measuring processes' (the test process's
RUSAGE_CHILDREN would also hold any earlier test's subprocess reaped meanwhile)."""


NO_WEIGHTS_RSS_KIB = 3 * 2**20
"""3 GiB: under one Llama-2-70B decoder layer's fp32 weights (3.2 GiB), so a capture that allocated any layer fails;
measured 0.42 GB on the development machine and 2.25 GB in a fresh CI environment (torch and inductor imports,
two measuring processes)."""


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, f"expected one error line, got: {err}"
    return err[0]


def test_enumeration_prunes_layouts_that_do_not_divide() -> None:
    cfg = dataclasses.replace(load_config("tiny-llama"), intermediate_size=700)  # 700 % 8 != 0: no tp 8
    layouts, pruned = enumerate_layouts(cfg, devices=16, seq_len=128, global_batch=32, spec=DEVICES["h100"],
                                        space=Space())
    assert layouts and any("MLP width" in r for r in pruned)
    seen = set()
    for lay, mbs in layouts:
        assert lay.world_size == 16 and lay.tp in (1, 2, 4) and lay.cp == 1  # 128 tokens: no context parallelism
        assert lay.dp * lay.micro_batches * mbs == 32
        assert lay.pp * lay.vpp <= cfg.num_hidden_layers and (lay.pp == 1 or lay.micro_batches >= lay.pp)
        assert lay.sequence_parallel == (lay.tp > 1) and (not lay.zero1 or lay.dp > 1)
        seen.add((lay.tp, lay.pp, lay.dp, lay.vpp))
    assert (4, 4, 1, 1) in seen and (1, 1, 16, 1) in seen and (2, 2, 4, 2) in seen


def test_predict_matches_the_compile_report_of_the_same_plan() -> None:
    from graphllm.job import build
    from graphllm.plan import CompilePlan
    from graphllm.planner import predict
    from graphllm.report import build_report

    plan = CompilePlan(model="tiny-llama", backend="eager", batch_size=2, seq_len=64)
    pred = predict(plan, "cpu")
    built = build(plan, warm=True)
    report = build_report(built, plan.batch_size * plan.seq_len)
    mem = report["memory"]
    assert pred.rank == 0 and pred.memory["parameters"] == mem["parameter_bytes"]
    assert pred.memory["gradients"] == mem["gradient_bytes"] and pred.memory["optimizer"] == mem["optimizer_bytes"]
    assert pred.memory["activations"] == mem["activation_bytes_peak_estimate"]
    assert pred.flops_per_step == report["flops_per_step"]  # one micro-batch, one rank
    assert set(pred.step_seconds) == {"compute", "communication", "bubble", "optimizer", "total"}
    assert pred.step_seconds["total"] == pytest.approx(sum(v for k, v in pred.step_seconds.items() if k != "total"))
    assert pred.step_seconds["optimizer"] > 0 and pred.step_seconds["total"] > 0 and 0 < pred.mfu <= 1
    # inductor partitions policy none with its min-cut partitioner (recomputing cheap pointwise ops): fewer saved
    # activations than the eager backend's default partition, as the inductor build's own report says
    fused = predict(dataclasses.replace(plan, backend="inductor"), "cpu")
    assert 0 < fused.memory["activations"] < pred.memory["activations"]


def test_predict_counts_the_mtp_modules_like_the_compile_report() -> None:
    """--mtp-layers: the modules' parameters, activations and FLOPs are the compile report's (they are captured with
    the model), and more than the plain model's."""
    from graphllm.job import build
    from graphllm.plan import CompilePlan
    from graphllm.planner import predict
    from graphllm.report import build_report

    from graphllm.planning.mtp_config import MtpConfig

    plan = CompilePlan(model="tiny-llama", backend="eager", batch_size=2, seq_len=64, mtp=MtpConfig(layers=1))
    pred = predict(plan, "cpu")
    report = build_report(build(plan, warm=True), plan.batch_size * plan.seq_len)
    mem = report["memory"]
    assert pred.memory["parameters"] == mem["parameter_bytes"] and pred.flops_per_step == report["flops_per_step"]
    assert pred.memory["activations"] == mem["activation_bytes_peak_estimate"]
    plain = predict(dataclasses.replace(plan, mtp=MtpConfig()), "cpu")
    assert plain.memory["parameters"] < pred.memory["parameters"] and plain.flops_per_step < pred.flops_per_step


def test_memory_is_the_largest_phase_not_the_sum_of_terms() -> None:
    """graphllm.planner.memory: terms that never coexist are not added, and ZeRO-1's step holds the gradients,
    its updated range, the all-gathered parameters and the collective library's copy (optimizer_memory's bytes)."""
    from graphllm.planner.memory import rank_memory
    from graphllm.planning.layout import Layout
    from graphllm.planning.optimizer_memory import optimizer_bytes

    numel, acts = 7_000_000, 90 * 2**20
    kw = dict(params_dtype="fp32", offload=False, accumulates=False)
    plain = rank_memory(numel, 2_000_000, acts, 0, Layout(), gather_copies=0, **kw)
    ob = optimizer_bytes(numel)
    steady = ob["parameter_bytes"] + ob["optimizer_device_bytes"]
    largest_grad = optimizer_bytes(2_000_000)["gradient_bytes"]
    assert plain["phase"] == "backward" and plain["total"] == steady + acts + largest_grad
    assert plain["total"] < sum(plain[k] for k in ("parameters", "gradients", "optimizer", "activations"))
    zero = rank_memory(numel, 2_000_000, acts / 4, 0, Layout(dp=2, zero1=True), gather_copies=1, **kw)
    oz = optimizer_bytes(numel, zero1=True, dp=2)
    p = oz["parameter_gather_bytes"]
    assert zero["phase"] == "optimizer" and zero["optimizer_step"] == p // 2 + 2 * p
    assert zero["total"] == oz["parameter_bytes"] + oz["optimizer_device_bytes"] + oz["gradient_bytes"] + p // 2 + 2 * p
    accumulating = rank_memory(numel, 2_000_000, acts, 0, Layout(), gather_copies=0, **{**kw, "accumulates": True})
    assert accumulating["total"] == plain["total"] + ob["gradient_bytes"]  # an earlier micro-batch's gradients


def test_collective_calls_pay_the_devices_latency() -> None:
    from graphllm.planner.measure import Part
    from graphllm.planner.predict import _ingraph_comm_seconds
    from graphllm.planning.layout import Layout

    spec, layout = DEVICES["h100"], Layout(tp=2)
    part = Part(comm={"tp all_reduce": 2**20})
    one = _ingraph_comm_seconds(part, layout, spec)
    many = _ingraph_comm_seconds(dataclasses.replace(part, comm_calls=100), layout, spec)
    assert one > 0 and many == pytest.approx(one + 100 * spec.collective_latency)
    assert part.scaled(4.0).comm_calls == part.comm_calls  # more rows per call, not more calls


def test_device_table_and_sizes() -> None:
    for name, spec in DEVICES.items():
        assert spec.peak_flops > 1e14 and spec.hbm_bandwidth > 1e12 and spec.memory > 2**35, name
        assert spec.intra_node_bandwidth > spec.inter_node_bandwidth and spec.source
        assert 0 < spec.collective_latency < 1e-4 and spec.gather_copies == 0, name
    assert device_spec("h100", memory=parse_bytes("64GiB")).memory == 64 * 2**30
    assert parse_bytes("80GB") == 80_000_000_000


def test_llama2_70b_plans_on_64_devices_without_allocating_weights() -> None:
    """One graph measurement at Llama-2-70B's widths in a child process: its peak RSS stays far below one layer's
    fp32 weights (3.4 GB), and the emitted command is one `graphllm compile` accepts."""
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS_OF_MAIN, "plan", "--model", "llama2-70b", "--devices", "64",
                           "--device", "h100", "--seq-len", "4096", "--global-batch", "1024", "--tp", "8", "--cp",
                           "1", "--recompute", "full", "--micro-batch-sizes", "1", "--no-cache", "--emit", "--top",
                           "3"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rss_kib = int(proc.stderr.strip().splitlines()[-1].removeprefix("peak-rss-kib "))
    assert rss_kib < NO_WEIGHTS_RSS_KIB, f"peak RSS {rss_kib / 2**20:.1f} GiB"
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("# graphllm plan: llama2-70b on 64")
    assert lines[1].split("\t")[:3] == ["#", "layout", "mbs"] and lines[2].split("\t")[1].startswith("tp8×")
    emitted = lines[-1]
    assert emitted.startswith("graphllm compile --model meta-llama/Llama-2-70b-hf")
    opts = {k.removeprefix("opt:"): v for k, v in
            vars(command_parser(build_parser(), "compile").parse_args(shlex.split(emitted)[2:])).items()}
    n = {k: int(opts.get(f"layout.{k}") or 1) for k in ("tp", "pp", "dp", "cp", "micro_batches")}
    assert n["tp"] == 8 and opts["seq_len"] == "4096" and opts["recompute.policy"] == "full"
    assert opts["device"] == "cuda" and n["tp"] * n["pp"] * n["dp"] * n["cp"] == 64
    assert n["dp"] * n["micro_batches"] * int(opts["batch_size"]) == 1024


def test_emit_builds_the_same_plan_in_graphllm_compile(capsys) -> None:
    from graphllm.options import from_flags
    from graphllm.plan import CompilePlan

    assert main(["plan", *TINY_FAST, "--devices", "4", "--device", "cpu", "--global-batch", "8", "--emit"]) == 0
    out = capsys.readouterr().out.splitlines()
    emitted = shlex.split(out[-1])
    assert emitted[:2] == ["graphllm", "compile"]
    plan = from_flags(CompilePlan, command_parser(build_parser(), "compile").parse_args(emitted[2:]))
    assert plan.layout.world_size == 4 and plan.global_batch_size == 8 and plan.model == "tiny-llama"
    rows = [r.split("\t") for r in out[2:-1]]
    assert rows and all(r[1].replace("+", "×").split("×")[0] in ("tp1", "tp2") for r in rows)


def test_memory_features_are_searched_priced_and_emitted(tmp_path) -> None:
    """--memory-features params-bf16,offload-optimizer: each layout is priced with each on and off; offload moves the
    optimizer state off the device and pays the host link twice a step; the emitted command compiles that plan."""
    import argparse

    from graphllm.cli.plan_cmd import emit_command
    from graphllm.options import from_flags
    from graphllm.plan import CompilePlan
    from graphllm.planner.search import memory_options, search

    spec = DEVICES["h100"]
    opts = memory_options(("params-bf16", "offload-optimizer"))
    assert len(opts) == 4 and opts[0].count == 0
    result = search(load_config("tiny-llama"), devices=1, spec=spec, seq_len=128, global_batch=2, amp="bf16",
                    space=Space(mbs=(2,), recompute=("none",), options=opts), jobs=1, cache_dir=tmp_path)
    by = {(c.options.params_dtype, c.options.offload_optimizer): c for c in result.candidates}
    assert len(by) == 4 and not result.candidates[0].options.offload_optimizer  # everything fits: offload only costs
    plain, off = by[("fp32", False)].prediction, by[("fp32", True)].prediction
    assert plain.memory["optimizer"] > 0 and off.memory["optimizer"] == 0
    streamed = off.step_seconds["optimizer"] - plain.step_seconds["optimizer"]
    assert streamed == pytest.approx(2 * plain.memory["optimizer"] / spec.host_bandwidth, rel=0.01)
    args = argparse.Namespace(seq_len=128, amp="bf16")
    emitted = shlex.split(emit_command(by[("bf16", True)], "tiny-llama", args, spec_name="cpu"))
    plan = from_flags(CompilePlan, command_parser(build_parser(), "compile").parse_args(emitted[2:]))
    assert plan.params_dtype == "bf16" and plan.offload_optimizer and plan.amp == "fp32"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["plan", "--memory-features", "offload-activations"])


def test_a_cache_that_cannot_be_written_is_skipped(tmp_path) -> None:
    """The measurement cache only saves time: a cache path that is a file (as a full disk or a read-only home
    fails) leaves the plan as it is, and a torn cache file is measured again."""
    from graphllm.planner.measure import Key, _cache_path, _load, _store, measure

    cfg, key = load_config("tiny-llama"), Key(tp=1, cp=1, sp=False, recompute="none", mbs=1, seq_len=64)
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")
    m = measure(cfg, key, cache_dir=blocked / "sub")
    assert not (blocked / "sub").exists()
    torn = _cache_path(tmp_path / "c", cfg, key)
    torn.parent.mkdir()
    torn.write_text('{"layer": {')
    assert _load(torn) is None  # measured again
    _store(torn, m)
    assert _load(torn) == m and [p.name for p in torn.parent.iterdir()] == [torn.name]


@pytest.mark.parametrize("argv, says", [
    (["--device", "tpu"], "known devices: a2, a3, h100, h200, cpu"),
    (["--device", "cpu", "--devices", "3", "--global-batch", "2"], "no layout of 3 devices"),
    (["--device", "cpu", "--device-memory", "lots"], "is not a size"),
    (["--device", "cpu", "--devices", "0"], "must be ≥ 1"),
    (["--device", "h100", "--json", "/nonexistent-dir/plans.json"], "cannot write it"),
    (["--device", "cpu", "--moe-capacity-factor", "0"], "--moe-capacity-factor 0.0 must be > 0"),
    (["--device", "cpu", "--moe-capacity-factor", "1.25"], "--moe-capacity-factor 1.25: llama is dense"),
])
def test_bad_input_exits_2_with_one_line(argv, says, capsys) -> None:
    base = ["plan", *TINY_FAST, "--devices", "4", "--global-batch", "8"]
    assert main(base + argv) == EXIT_USER_ERROR
    line = _error_line(capsys)
    assert line.startswith("graphllm plan: error: ") and says in line


def test_a_model_that_fits_nowhere_says_what_dominates(capsys) -> None:
    argv = ["plan", *TINY_FAST, "--devices", "2", "--global-batch", "4", "--device", "h100", "--device-memory",
            "16MiB"]
    assert main(argv) == EXIT_USER_ERROR
    line = _error_line(capsys)
    assert "no plan fits in 0.0 GiB per device: the smallest" in line and "dominates" in line


def test_cpu_probe_is_kept_per_thread_count() -> None:
    from graphllm.planner.devices import GLOO_CALL_LATENCY, cpu_spec

    spec = cpu_spec(threads=1)
    assert cpu_spec(threads=1) is spec and "1 thread" in spec.name
    assert spec.peak_flops > 0 and spec.hbm_bandwidth > 0 and spec.intra_node_bandwidth > 0
    assert spec.collective_latency == GLOO_CALL_LATENCY and spec.gather_copies == 1  # gloo: gathers, then copies


def test_backward_transient_counts_what_inductor_cannot_write_in_place() -> None:
    """node_costs.transient_bytes: a tensor a matmul reads is a transient unless, under inductor's buffer reuse, a
    same-sized input dies at the op that makes it (its buffer is written over); gradients returned are not."""
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx

    from graphllm.planner.node_costs import transient_bytes

    def f(saved, w):
        k = saved.exp()  # a matmul reads it; saved is read again later: k needs a buffer of its own
        return k @ w, (k + 1) @ w, saved.sum()  # k dies at the add: inductor writes k + 1 over it

    gm = make_fx(f, tracing_mode="fake")(torch.randn(64, 32), torch.randn(32, 8))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    by_op = {str(n.target).split(".")[1]: n for n in gm.graph.nodes if n.op == "call_function"}
    size = 64 * 32 * 4
    assert transient_bytes(by_op["exp"], order, reuse=True) == size
    assert transient_bytes(by_op["add"], order, reuse=True) == 0.0
    assert transient_bytes(by_op["add"], order, reuse=False) == size  # eager: every op allocates
    assert transient_bytes(by_op["sum"], order, reuse=False) == 0.0  # returned: counted elsewhere

    def scatter(src, idx, w):  # an accumulating scatter is a kernel of its own: its buffer exists, fused or not
        return (torch.zeros_like(src).scatter_add(0, idx, src) + 1) @ w

    gm = make_fx(scatter, tracing_mode="fake")(torch.randn(64, 32), torch.zeros(64, 32, dtype=torch.long),
                                               torch.randn(32, 8))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    by_op = {str(n.target).split(".")[1]: n for n in gm.graph.nodes if n.op == "call_function"}
    assert transient_bytes(by_op["scatter_add"], order, reuse=True) == size


def test_expert_parallel_is_searched_and_priced_from_its_own_graphs() -> None:
    """A mixture-of-experts model: the search tries ep (the divisors of dp that divide the experts) and both token
    dispatchers, each measured on its own expert-parallel graphs. An ep2 rank holds exactly half of each MoE layer's
    experts, computes the same FLOPs, and its graphs move tokens over the ep group; `--emit` names --ep and the
    dispatcher. (Against the compile report of an ep2 build: docs/planner.md.)"""
    import torch
    import transformers
    from types import SimpleNamespace

    from graphllm.cli.plan_cmd import emit_command
    from graphllm.models import LlamaForCausalLM, ModelConfig
    from graphllm.planner.measure import Key, measure
    from graphllm.planner.search import search
    from hf_parity import FAMILIES

    cfg = ModelConfig.from_hf(transformers.MixtralConfig(**FAMILIES["mixtral"][2]).to_dict(), source="mixtral")
    space = Space(tp=(1,), cp=(1,), mbs=(1,), vpp=(1,), recompute=("none",), zero1=(False,))
    result = search(cfg, devices=2, spec=device_spec("h100"), seq_len=64, global_batch=2, space=space, jobs=1)
    by = {(c.layout.ep, c.dispatcher): c.prediction for c in result.candidates if c.layout.pp == 1}
    assert set(by) == {(1, "allgather"), (2, "allgather"), (2, "alltoall")}
    with torch.device("meta"):
        experts = sum(p.numel() for n, p in LlamaForCausalLM(cfg).named_parameters() if ".experts." in n)
    fp32 = 4
    for disp in ("allgather", "alltoall"):
        two = by[2, disp]
        assert by[1, "allgather"].memory["parameters"] - two.memory["parameters"] == experts // 2 * fp32
        assert two.flops_per_step == by[1, "allgather"].flops_per_step
        assert two.step_seconds["communication"] > by[1, "allgather"].step_seconds["communication"]
        comm = measure(cfg, Key(seq_len=64, amp="bf16", ep=2, moe_dispatcher=disp)).layer.comm
        assert any(k.startswith("ep ") for k in comm), comm
    best_ep = next(c for c in result.candidates if c.layout.ep == 2 and c.dispatcher == "alltoall")
    argv = shlex.split(emit_command(best_ep, "mixtral-dir", SimpleNamespace(seq_len=64, amp="bf16"), spec_name="h100"))
    assert argv[argv.index("--ep") + 1] == "2" and argv[argv.index("--moe-dispatcher") + 1] == "alltoall"
    # --moe-capacity-factor: priced from graphs with capacity-bounded dispatch buffers, and emitted
    capped = search(cfg, devices=2, spec=device_spec("h100"), seq_len=64, global_batch=2, jobs=1,
                    space=dataclasses.replace(space, ep=(2,), dispatchers=("alltoall",), capacity_factor=1.0))
    one = next(c for c in capped.candidates if c.layout.pp == 1)
    assert one.prediction.memory["activations"] < by[2, "alltoall"].memory["activations"]
    args = SimpleNamespace(seq_len=64, amp="bf16", moe_capacity_factor=1.0)
    assert "--moe-capacity-factor 1" in emit_command(one, "mixtral-dir", args, spec_name="h100")


@pytest.mark.parametrize("family, fields", [("deepseek-v3", {"num_hidden_layers": 4, "first_k_dense_replace": 2}),
                                            ("qwen3-moe", {"num_hidden_layers": 3, "mlp_only_layers": [0, 2]})])
def test_mixed_dense_and_moe_layers_are_each_priced(tmp_path, family, fields) -> None:
    """A model whose layers mix dense and MoE MLPs (DeepSeek-V3's first dense layers, Qwen3-MoE's mlp_only_layers)
    is measured twice (two MoE layers, two dense ones) and each layer priced as its kind: parameters, activations
    and FLOPs equal the compile report of the real model."""
    import torch

    from graphllm.job import build
    from graphllm.plan import CompilePlan
    from graphllm.planner import predict
    from graphllm.report import build_report
    from hf_parity import FAMILIES

    cfg_cls, model_cls, kwargs, _ = FAMILIES[family]
    torch.manual_seed(0)
    model_cls(cfg_cls(**{**kwargs, **fields})).save_pretrained(tmp_path / "hf")
    plan = CompilePlan(model=str(tmp_path / "hf"), backend="eager", batch_size=2, seq_len=32)
    pred = predict(plan, "cpu")
    report = build_report(build(plan, warm=True), plan.batch_size * plan.seq_len)
    mem = report["memory"]
    assert pred.memory["parameters"] == mem["parameter_bytes"]
    assert pred.memory["activations"] == mem["activation_bytes_peak_estimate"]
    assert pred.flops_per_step == report["flops_per_step"]
