"""The Ascend pre-flight on graphllm's own graphs: every default graph of every supported family and layout
passes it (`graphllm compile --backend npu --dry-run`, against the torch_npu 2.13.0 wheel's torchair), and a
user pass that inserts an op torchair cannot convert fails it with that op, its pass and its source line.

Single-rank plans run in this process; layouts run on real gloo ranks (tests/dist_util.py). Each dry run also
compiles and checks the generation graphs on rank 0. The first run downloads the torch_npu wheel (43 MB) into
the graphllm cache, as tests/test_npu_contract.py does.
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap

import pytest

from dist_util import run_ranks
from graphllm.cli.main import EXIT_USER_ERROR, main

BASE = ["--backend", "npu", "--batch-size", "2", "--seq-len", "32"]
HD64 = dict(vocab_size=128, hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=256)
"""A Llama with head_dim 64: the size at which the rope kernels' backward converts (npu_rotary_mul_backward,
npu_apply_rotary_pos_emb), so the fused-rope path is covered (tiny-llama's 32 takes the ATen rope)."""


def _plan(argv: list[str]):
    from graphllm.options import add_flags, from_flags
    from graphllm.plan import CompilePlan

    parser = argparse.ArgumentParser()
    add_flags(parser, CompilePlan)
    return from_flags(CompilePlan, parser.parse_args(argv))


def dry_run(argv: list[str], out: str) -> dict:
    """compile_artifact(dry_run=True) of the plan `argv` (compile's flags), on this rank: the merged preflight
    (rank 0) or None."""
    from graphllm.job import compile_artifact

    _, report = compile_artifact(_plan(argv), out, dry_run=True)
    return report.get("preflight")


def _graphs(pre: dict) -> set[tuple[int, str]]:
    return {(c["rank"], c["graph"]) for c in pre["checks"]}


def _assert_passes(pre: dict) -> None:
    flagged = [(c["rank"], c["graph"], o["op"], o["status"], o["detail"]) for c in pre["checks"] for o in c["ops"]
               if o["status"] not in ("fused kernel", "converter", "builtin")]
    assert pre["blocking"] is None and flagged == [], flagged
    assert pre["counts"]["fused kernel"] >= 5, pre["counts"]  # the npu lowering ran: rms_norm, swiglu, attention…


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, str]:
    import transformers

    import hf_parity

    out = {}
    for family in ("llama", "llama-bias-rope-llama3", "qwen2-tied", "mistral-gqa-headdim"):
        path = tmp_path_factory.mktemp(family)
        out[family] = str(hf_parity.save_hf_checkpoint(hf_parity.hf_model(family, "sdpa"), family, path))
    path = tmp_path_factory.mktemp("hd64")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**HD64)).save_pretrained(path)
    out["llama-hd64"] = str(path)
    return out


SINGLE = {
    "tiny-bf16-full-recompute": ["--model", "tiny-llama", "--amp", "bf16", "--recompute", "full"],
    "tiny-packed-selective": ["--model", "tiny-llama", "--eod-reset", "--recompute", "selective"],
    "tiny-lora": ["--model", "tiny-llama", "--lora-rank", "4"],
    "tiny-dpo": ["--model", "tiny-llama", "--task", "dpo"],
    "tiny-rm": ["--model", "tiny-llama", "--task", "rm"],  # its last-token pick once needed aten.index_put (a stub)
}


@pytest.mark.parametrize("name", list(SINGLE))
def test_default_graphs_pass_single_rank(name, tmp_path):
    pre = dry_run(BASE + SINGLE[name], str(tmp_path / "a"))
    _assert_passes(pre)
    assert {(0, "forward"), (0, "backward"), (0, "generate/decode")} <= _graphs(pre)
    if name == "tiny-dpo":
        assert (0, "reference/inference") in _graphs(pre) or (0, "reference/forward") in _graphs(pre)


@pytest.mark.parametrize("family", ["llama", "llama-bias-rope-llama3", "qwen2-tied", "mistral-gqa-headdim",
                                    "llama-hd64"])
def test_default_graphs_pass_for_each_family(family, hf_dirs, tmp_path):
    pre = dry_run(BASE + ["--model", hf_dirs[family], "--amp", "bf16"], str(tmp_path / "a"))
    _assert_passes(pre)
    ops = {o["op"] for c in pre["checks"] for o in c["ops"]}
    if family == "llama-hd64":  # the fused rope, forward and backward, and generation's q/k rope kernel
        assert {"npu.npu_rotary_mul_backward.default", "npu.npu_apply_rotary_pos_emb.default"} <= ops, ops


LAYOUTS = {
    "tp2-sp-mc2-bf16-selective": (2, ["--tp", "2", "--sequence-parallel", "--mc2", "--amp", "bf16",
                                      "--recompute", "selective"]),
    "tp2-pp2-vpp2": (4, ["--tp", "2", "--pp", "2", "--vpp", "2", "--micro-batches", "2", "--batch-size", "1"]),
    "tp2-coc-dp2-zero1": (4, ["--tp", "2", "--coc-parallel-num", "2", "--dp", "2", "--zero1", "--batch-size", "1"]),
    "cp2-ring-bf16": (2, ["--cp", "2", "--amp", "bf16", "--batch-size", "1"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_default_graphs_pass_for_each_layout(name, tmp_path):
    ranks, extra = LAYOUTS[name]
    pre = run_ranks(dry_run, ranks, BASE + ["--model", "tiny-llama"] + extra, str(tmp_path / "a"))[0]
    _assert_passes(pre)
    assert {c["rank"] for c in pre["checks"]} == set(range(ranks))
    ops = {o["op"] for c in pre["checks"] for o in c["ops"]}
    if "--mc2" in extra:  # under bf16 autocast the MC2 kernels themselves run, not their CoC fallback
        assert {"npu.npu_all_gather_base_mm.default", "npu.npu_mm_reduce_scatter_base.default"} <= ops, ops
    if "--cp" in extra:  # the ring's blocks on the fused kernel, its shifts on torchair's all-to-all
        assert {"npu.npu_fusion_attention.default", "npu_define.all_to_all_single_npu.default"} <= ops, ops


def test_cli_dry_run_writes_an_npu_artifact_and_inspect_shows_every_op(tmp_path, capsys):
    out = tmp_path / "npu"
    assert main(["compile", "--model", "tiny-llama", *BASE, "--dry-run", "--out", str(out)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert (plan["plan"]["backend"], plan["plan"]["device"]) == ("npu", "npu")  # runs as is on an Ascend machine
    assert [s["step"] for s in plan["pipeline"] if s["stage"] == "backend"] == ["npu"]
    err = capsys.readouterr().err
    assert "npu pre-flight against torch_npu 2.13.0" in err and "distinct ops over all graphs" in err
    assert main(["inspect", str(out), "--npu-coverage"]) == 0
    lines = capsys.readouterr().out.splitlines()  # not a tty: `# title`, then TSV
    header = lines[1].split("\t")
    assert header == ["rank", "graph", "op", "count", "status", "detail", "made by", "source"]
    rows = [dict(zip(header, line.split("\t"))) for line in lines[2:] if "\t" in line]
    kinds = {(r["graph"], r["op"]): r["status"] for r in rows}
    assert kinds[("forward", "npu.npu_fusion_attention.default")] == "fused kernel"
    assert kinds[("backward", "npu.npu_fusion_attention_grad.default")] == "fused kernel"
    assert kinds[("generate/decode", "aten.mm.default")] == "converter"
    assert main(["inspect", str(out), "--npu-coverage", "--rank", "1"]) == EXIT_USER_ERROR
    assert "has the pre-flight of ranks 0" in capsys.readouterr().err


def test_a_user_pass_inserting_a_stub_op_fails_the_dry_run(tmp_path, monkeypatch, capsys):
    """aten.sinc's GE converter only raises NotImplementedError: the dry run exits 2 naming it, the user pass
    that inserted it and the model line it came from; the artifact is still written, for inspect."""
    (tmp_path / "sincpass.py").write_text(textwrap.dedent('''
        import torch
        from graphllm.passes import graph_pass

        aten = torch.ops.aten

        @graph_pass("add_sinc", stage="model")
        def add_sinc(gm, ctx):
            heads = (aten.linear.default, torch.ops.graphllm.linear_cross_entropy.default)  # the LM head, fused or not
            head = [n for n in gm.graph.nodes if n.target in heads][-1]
            x = head.args[0]
            with gm.graph.inserting_before(head):
                zero = gm.graph.call_function(aten.mul.Tensor, (gm.graph.call_function(aten.sinc.default, (x,)), 0.0))
                y = gm.graph.call_function(aten.add.Tensor, (x, zero))
            for n in (zero, y, zero.args[0]):
                n.meta.update({k: head.meta[k] for k in ("stack_trace",) if k in head.meta})
            head.replace_input_with(x, y)
            gm.recompile()
            return gm
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "npu"
    code = main(["compile", "--model", "tiny-llama", *BASE, "--dry-run", "--pass", "sincpass:add_sinc",
                 "--out", str(out)])
    assert code == EXIT_USER_ERROR
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "aten.sinc.default" in line and "stub" in line and "add_sinc" in line and "models/decoder.py" in line, line
    assert json.loads((out / "preflight.json").read_text())["blocking"] in line


@pytest.mark.parametrize("argv, expected", [
    (["--backend", "eager", "--dry-run"], "--dry-run checks graphs for the Ascend backend: add --backend npu"),
    (["--backend", "npu", "--dry-run", "--torch-npu-wheel", "/nonexistent/torch_npu.whl"], "/nonexistent"),
])
def test_dry_run_bad_input_is_one_line(argv, expected, tmp_path, capsys):
    before = os.environ.get("GRAPHLLM_TORCH_NPU_WHEEL")
    out = tmp_path / "x"
    assert main(["compile", "--model", "tiny-llama", "--batch-size", "2", "--seq-len", "32", *argv,
                 "--out", str(out)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not out.exists()
    assert os.environ.get("GRAPHLLM_TORCH_NPU_WHEEL") == before  # --torch-npu-wheel does not outlive the command


def test_inspect_npu_coverage_of_a_non_npu_artifact_is_refused(tiny_artifact, capsys):
    assert main(["inspect", str(tiny_artifact), "--npu-coverage"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was not compiled for the Ascend backend" in err[0], err
