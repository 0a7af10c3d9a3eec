"""The `graphllm` command end to end: compile → inspect → run, and bad input (exit 2, one line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from graphllm.cli.main import EXIT_USER_ERROR, main

FAST = ["--backend", "eager", "--batch-size", "2", "--seq-len", "32"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("art") / "tiny"
    assert main(["compile", "--model", "tiny-llama", "--out", str(out), *FAST]) == 0
    return out


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, f"expected one error line, got: {err}"
    return err[0]


def test_compile_writes_artifact(artifact: Path) -> None:
    plan = json.loads((artifact / "plan.json").read_text())
    assert plan["plan"]["model"] == "tiny-llama" and plan["plan"]["backend"] == "eager"
    assert [s["step"] for s in plan["pipeline"] if s["stage"] == "model"] == [
        "fuse_rms_norm", "fuse_add_rms_norm", "fuse_swiglu", "fuse_rope", "fuse_attention", "fold_constants",
        "fuse_linear_cross_entropy"]
    model_dumps = sorted(p.name for p in (artifact / "graphs/rank0/model").glob("*.py"))
    assert model_dumps[0] == "00_capture.py" and model_dumps[-1] == "08_lower_ops.py"
    for kind in ("forward", "backward"):
        code = (artifact / f"graphs/rank0/train/{kind}.py").read_text()
        assert "def forward" in code and "models/attention.py" in code  # provenance survives aot_autograd
    # aot inputs are named after the parameters they are
    assert "#   primals_2 = model.layers.0.self_attn.q_proj.weight" in \
        (artifact / "graphs/rank0/train/forward.py").read_text()
    fused = (artifact / "graphs/rank0/model/05_fuse_attention.py").read_text()
    assert "torch.ops.graphllm.attention.default" in fused
    assert "models/attention.py" in fused  # provenance back to the model source
    report = json.loads((artifact / "report.json").read_text())
    assert report["parameters"] == 7_047_424
    assert report["flops_per_step"] > 0 and report["saved_activation_bytes"] > 0
    assert "fuse_rms_norm" in (artifact / "report.md").read_text()


def test_inspect_pipeline_prints_the_steps(artifact: Path, capsys) -> None:
    assert main(["inspect", str(artifact), "--pipeline"]) == 0
    title, *lines = capsys.readouterr().out.splitlines()  # not a tty: a `# title` line, then TSV
    assert title.startswith("# ") and title.endswith("rank 0: pipeline")
    header, *rows = [line.split("\t") for line in lines]
    assert header == ["#", "step", "stage", "options", "origin", "why", "changed"]
    assert [(r[1], r[2]) for r in rows] == [(n, "model") for n in ("fuse_rms_norm", "fuse_add_rms_norm", "fuse_swiglu",
                                                                      "fuse_rope", "fuse_attention", "fold_constants",
                                                                      "fuse_linear_cross_entropy")] \
        + [("lower_ops", "lower"), ("partition", "partition"), ("eager", "backend")]
    assert all(r[5] for r in rows)  # every step says why it is there
    assert rows[0][4] == "graphllm.passes.fuse_rms_norm" and "replaced 9" in rows[0][6]


def test_inspect_lists_shows_and_diffs(artifact: Path, capsys) -> None:
    assert main(["inspect", str(artifact)]) == 0
    out = capsys.readouterr().out
    assert "04_fuse_rope" in out and "backward" in out
    assert main(["inspect", str(artifact), "--show", "fuse_swiglu"]) == 0
    assert "graphllm.swiglu" in capsys.readouterr().out
    assert main(["inspect", str(artifact), "--show", "1", "--table"]) == 0
    assert "rms_norm" in capsys.readouterr().out
    assert main(["inspect", str(artifact), "--diff", "capture", "fuse_rms_norm"]) == 0
    diff = capsys.readouterr().out
    assert "-        pow_1" in diff and "+        rms_norm" in diff


def test_run_trains_and_loss_falls(artifact: Path, capsys, tmp_path: Path) -> None:
    metrics = tmp_path / "m.jsonl"
    assert main(["run", str(artifact), "--steps", "40", "--no-progress", "--metrics", str(metrics)]) == 0
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert rows[0]["event"] == "start" and len(steps) == 40
    first, last = steps[0]["loss"], sum(r["loss"] for r in steps[-5:]) / 5
    assert last < first - 1.0, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert all(r["tokens_per_s"] > 0 for r in steps)


@pytest.mark.parametrize("argv, needle", [
    (["compile", "--model", "no-such-model", "--out", "{tmp}/x"], "no-such-model"),
    (["compile", "--backend", "tvm", "--out", "{tmp}/x"], "unknown backend 'tvm'"),
    (["compile", "--backend", "npu", "--out", "{tmp}/x"], "torch_npu"),
    (["compile", "--seq-len", "0", "--out", "{tmp}/x"], "--seq-len"),
    (["compile", "--disable", "fuse_nothing", "--out", "{tmp}/x", *FAST], "fuse_nothing"),
    (["compile", "--pass", "nomodule", "--out", "{tmp}/x", *FAST], "MODULE:NAME"),
    (["compile", "--pass", "json:dumps", "--out", "{tmp}/x", *FAST], "not a function decorated"),
    (["run", "{tmp}/missing"], "does not exist"),
    (["inspect", "{tmp}/missing"], "does not exist"),
])
def test_bad_input_is_one_line_exit_2(argv, needle, tmp_path: Path, capsys) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == EXIT_USER_ERROR
    assert needle in _error_line(capsys)


def test_compile_refuses_to_overwrite_foreign_directory(tmp_path: Path, capsys) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main(["compile", "--out", str(out), *FAST]) == EXIT_USER_ERROR
    assert "not a graphllm artifact" in _error_line(capsys)
    assert (out / "precious.txt").read_text() == "keep me" and len(list(tmp_path.iterdir())) == 1


def _copy_artifact(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d["versions"].update(graphllm="0.0.1"), "compiled by graphllm 0.0.1"),
    (lambda d: d["graph_hash"].update(rank0="0" * 16), "is stale"),
    (lambda d: d["model"].update(fingerprint="f" * 16), "another model"),
    (lambda d: d["plan"].update(bogus=1), "unknown plan field"),
])
def test_run_refuses_stale_or_foreign_artifact(artifact: Path, tmp_path: Path, edit, needle, capsys) -> None:
    art = _copy_artifact(artifact, tmp_path / "a")
    data = json.loads((art / "plan.json").read_text())
    edit(data)
    (art / "plan.json").write_text(json.dumps(data))
    assert main(["run", str(art), "--steps", "1", "--no-progress"]) == EXIT_USER_ERROR
    assert needle in _error_line(capsys)


def test_run_refuses_corrupt_plan(artifact: Path, tmp_path: Path, capsys) -> None:
    art = _copy_artifact(artifact, tmp_path / "a")
    (art / "plan.json").write_text("{not json")
    assert main(["run", str(art)]) == EXIT_USER_ERROR
    assert "corrupt" in _error_line(capsys)


def test_inspect_unknown_graph(artifact: Path, capsys) -> None:
    assert main(["inspect", str(artifact), "--show", "fuse_everything"]) == EXIT_USER_ERROR
    assert "no graph named 'fuse_everything'" in _error_line(capsys)


def test_custom_pass_from_cli_is_recorded_and_rerun(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "mypasses.py").write_text(textwrap.dedent('''
        import torch
        from graphllm.passes import graph_pass

        @graph_pass("count_matmuls", stage="model")
        def count_matmuls(gm, ctx):
            n = sum(1 for node in gm.graph.nodes if node.target is torch.ops.aten.linear.default)
            ctx.count("linear", n)
            return gm
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "art"
    assert main(["compile", "--out", str(out), "--pass", "mypasses:count_matmuls", *FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    counted = next(p for p in report["passes"] if p["name"] == "count_matmuls")
    assert counted["counters"] == {"linear": 4 * 7 + 1}  # q k v o gate up down per layer, lm_head (tiny logits: unfused)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["plan"]["passes"] == ["mypasses:count_matmuls"]
    user = [s for s in plan["pipeline"] if s["user"]]
    assert [(s["step"], s["stage"], s["options"], s["changes_numerics"], s["origin"]) for s in user] == [
        ("count_matmuls", "model", {}, False, "mypasses")]
    assert main(["run", str(out), "--steps", "1", "--no-progress"]) == 0


def test_console_script_exit_code(tmp_path: Path) -> None:
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "graphllm", "run", str(tmp_path / "nope")], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == EXIT_USER_ERROR
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr


def test_corrupt_checkpoint_and_file_out_are_one_line_errors(tmp_path: Path, capsys) -> None:
    from graphllm.models import build_model, save_hf
    from graphllm.models.presets import PRESETS

    ckpt = save_hf(build_model(PRESETS["tiny-llama"]()), PRESETS["tiny-llama"](), tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated download
    assert main(["compile", "--model", str(ckpt), "--out", str(tmp_path / "a"), *FAST]) == EXIT_USER_ERROR
    assert "not a readable safetensors file" in _error_line(capsys)
    afile = tmp_path / "afile"
    afile.write_text("data")
    assert main(["compile", "--out", str(afile), *FAST]) == EXIT_USER_ERROR
    assert "is a file" in _error_line(capsys) and afile.read_text() == "data"


def test_tokenizer_larger_than_model_vocab_is_refused(tmp_path: Path, capsys) -> None:
    import dataclasses

    from graphllm.models import build_model, save_hf
    from graphllm.models.presets import PRESETS

    cfg = dataclasses.replace(PRESETS["tiny-llama"](), vocab_size=128)
    ckpt = save_hf(build_model(cfg), cfg, tmp_path / "ckpt")
    out = tmp_path / "art"
    assert main(["compile", "--model", str(ckpt), "--out", str(out), *FAST]) == 0
    capsys.readouterr()
    assert main(["run", str(out), "--steps", "1", "--no-progress"]) == EXIT_USER_ERROR
    assert "vocabulary of 128" in _error_line(capsys)
