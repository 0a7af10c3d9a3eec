"""Options declared once (graphllm/options.py): flags, checks, plan.json and docs all come from it.

- every option of CompilePlan / RunConfig has a flag with help, and `--help` shows defaults and choices;
- a value is checked the same however it arrives (flag, Python, plan.json) with one line naming the flag;
- plan.json round-trips, and a hand-edited plan.json with a wrongly-typed or unknown field is one line;
- docs/options.md is what the declarations generate.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from graphllm.errors import GraphllmError
from graphllm.options import add_flags, declared, from_flags
from graphllm.plan import CompilePlan
from graphllm.planning import Layout
from graphllm.run_config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def _parse(cls, argv):
    p = argparse.ArgumentParser()
    add_flags(p, cls)
    return from_flags(cls, p.parse_args(argv))


@pytest.mark.parametrize("cls", [CompilePlan, RunConfig])
def test_every_option_has_a_flag_with_help(cls) -> None:
    flags = [d.flag for d in declared(cls)]
    assert len(flags) == len(set(flags)), "two options share a flag"
    assert all(d.option.help for d in declared(cls))


def test_help_shows_defaults_and_choices(capsys) -> None:
    from graphllm.cli.main import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["compile", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--backend {eager,inductor,npu,npu-emulated}" in out and "(default: inductor)" in out
    assert "--recompute {none,full,selective,budget}" in out and "--tp N" in out


def test_flags_build_the_plan() -> None:
    plan = _parse(CompilePlan, ["--tp", "2", "--sequence-parallel", "--pp-layers", "2,2", "--pp", "2",
                                "--micro-batches", "2", "--recompute", "full", "--recompute-layers", "2",
                                "--pass", "a:b", "--pass", "c:d", "--disable", "fuse_rope,fuse_swiglu"])
    assert plan.layout == Layout(tp=2, pp=2, sequence_parallel=True, pp_layers=(2, 2), micro_batches=2)
    assert (plan.recompute.policy, plan.recompute.method, plan.recompute.layers) == ("full", "uniform", 2)
    assert plan.passes == ["a:b", "c:d"] and plan.disable == ["fuse_rope", "fuse_swiglu"]


@pytest.mark.parametrize("argv, needle", [
    (["--tp", "two"], "--tp must be an integer, got 'two'"),
    (["--tp", "0"], "--tp must be an integer ≥ 1, got 0"),
    (["--amp", "fp16"], "--amp must be one of fp32, bf16, got 'fp16'"),
    (["--backend", "tvm"], "unknown backend 'tvm'"),
    (["--coc-parallel-num", "3", "--tp", "2"], "--coc-parallel-num must be one of 1, 2, 4, 8"),
    (["--recompute-ops", "mlp", "--recompute", "selective"], "--recompute-ops"),
])
def test_bad_flag_values_are_one_line(argv, needle) -> None:
    with pytest.raises(GraphllmError, match=needle):
        _parse(CompilePlan, argv)


def test_the_same_check_from_python_and_plan_json() -> None:
    with pytest.raises(GraphllmError, match="--tp must be an integer ≥ 1, got 0"):
        Layout(tp=0)
    with pytest.raises(GraphllmError, match="plan.json: --tp must be an integer, got '2'"):
        CompilePlan.from_json({"layout": {"tp": "2"}}, "plan.json")
    with pytest.raises(GraphllmError, match=r"plan.json: unknown plan field\(s\) layout.tpp"):
        CompilePlan.from_json({"layout": {"tpp": 2}}, "plan.json")


def test_plan_json_round_trip() -> None:
    plan = _parse(CompilePlan, ["--tp", "2", "--pp", "2", "--micro-batches", "4", "--pp-layers", "1,3",
                                "--recompute", "selective", "--recompute-ops", "norm", "--npu-mode", "reduce-overhead"])
    again = CompilePlan.from_json(json.loads(json.dumps(plan.to_json())), "plan.json")
    assert again == plan


def test_hand_edited_plan_json_is_one_line(tmp_path: Path, capsys) -> None:
    from graphllm.cli.main import main
    from graphllm.job import compile_artifact

    art = tmp_path / "art"
    compile_artifact(CompilePlan(model="tiny-llama", backend="eager", batch_size=2, seq_len=32), art)
    data = json.loads((art / "plan.json").read_text())
    data["plan"]["batch_size"] = "four"
    (art / "plan.json").write_text(json.dumps(data))
    assert main(["run", str(art), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch-size must be an integer, got 'four'" in err[0], err
    data["plan"]["batch_size"], data["format"] = 2, 1
    (art / "plan.json").write_text(json.dumps(data))
    assert main(["inspect", str(art)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "plan format 1" in err[0] and "recompile" in err[0], err


def test_docs_options_md_is_generated() -> None:
    from graphllm.cli.options_doc import render

    assert (ROOT / "docs" / "options.md").read_text() == render(), \
        "docs/options.md is out of date: python -m graphllm.cli.options_doc > docs/options.md"
