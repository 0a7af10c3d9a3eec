"""Job files (`--config job.toml|yaml`, graphllm/job_config.py) and what a command records of its invocation.

- a file's [compile] / [run] section sets any flag of the command (`seq-len` or `seq_len`), typed as the flag
  expects; flags on the command line win; other sections are ignored; TOML and YAML read the same;
- every declared option of compile and run is accepted from a file, with no code of its own;
- an unknown key (with the nearest flag), a wrongly-typed value, a missing or unparseable file: one line, exit 2,
  nothing written;
- the artifact (invocation.json, shown by `graphllm inspect`) and a run's metrics header record every flag's
  final value and source, the command line and graphllm's git commit.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from graphllm.cli.main import build_parser, command_parser, main
from graphllm.errors import GraphllmError
from graphllm.job_config import SOURCES, apply_config, invocation, source_commit
from graphllm.options import FILE_VALUES, declared, from_flags
from graphllm.plan import CompilePlan
from graphllm.run_config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
TOML = """
[compile]
model = "tiny-llama"
seq_len = 64
tp = 2
sequence-parallel = true
disable = ["fuse_rope", "fuse_swiglu"]
pass = ["a:b"]
out = "from-file"

[run]
steps = 7
lr = 0.001
data = ["0.5", "A", "0.5", "B"]

[convert]
anything = "is ignored by compile and run"
"""
YAML = """
compile:
  model: tiny-llama
  seq_len: 64
  tp: 2
  sequence-parallel: true
  disable: [fuse_rope, fuse_swiglu]
  pass: ["a:b"]
  out: from-file
run:
  steps: 7
  lr: 0.001
  data: ["0.5", A, "0.5", B]
"""


def _parsed(argv: list[str]):
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_config(command_parser(parser, args.command), args)
    return args


@pytest.fixture(params=["toml", "yaml"])
def job_file(request, tmp_path: Path) -> Path:
    path = tmp_path / f"job.{request.param}"
    path.write_text(TOML if request.param == "toml" else YAML)
    return path


def test_a_file_sets_the_flags_and_the_command_line_wins(job_file: Path) -> None:
    args = _parsed(["compile", "--config", str(job_file), "--tp", "4", "--model", "small-llama"])
    plan = from_flags(CompilePlan, args)
    assert (plan.model, plan.seq_len, plan.layout.tp, plan.layout.sequence_parallel) == ("small-llama", 64, 4, True)
    assert plan.disable == ["fuse_rope", "fuse_swiglu"] and plan.passes == ["a:b"]
    assert args.out == Path("from-file")  # a flag of the command that is not a plan field
    sources = {key: source for key, (_, source) in getattr(args, SOURCES).items()}
    assert (sources["tp"], sources["seq-len"], sources["batch-size"]) == ("command line", "file", "default")
    run = from_flags(RunConfig, _parsed(["run", "art", "--config", str(job_file), "--steps", "3"]))
    assert (run.train.steps, run.train.lr, run.data) == (3, 0.001, ["0.5", "A", "0.5", "B"])


def _file_form(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("command, cls", [("compile", CompilePlan), ("run", RunConfig)])
def test_every_declared_option_is_accepted_from_a_file(tmp_path: Path, command: str, cls) -> None:
    options = [d for d in declared(cls) if d.option.cli and d.default is not None]
    path = tmp_path / "all.toml"
    import tomllib

    lines = [f"[{command}]"] + [f"{d.flag[2:]} = {json.dumps(_file_form(d.default))}" for d in options]
    assert tomllib.loads("\n".join(lines))  # the file is valid TOML
    path.write_text("\n".join(lines) + "\n")
    args = _parsed([command, *(["art"] if command == "run" else ["--out", "x"]), "--config", str(path)])
    assert len(getattr(args, FILE_VALUES)) == len(options)
    assert from_flags(cls, args) == cls()  # the defaults, read back from the file


@pytest.mark.parametrize("text, needle", [
    ("[compile]\nseq-lenght = 64\n", "[compile] seq-lenght: not a flag of graphllm compile; did you mean 'seq-len'?"),
    ("[compile]\nseq-len = \"64\"\n", "[compile] seq-len = '64': expected an integer (as --seq-len takes)"),
    ("[compile]\ndisable = \"fuse_rope\"\n", "disable = 'fuse_rope': expected a list of strings"),
    ("[compile]\neod-reset = 1\n", "eod-reset = 1: expected true or false"),
    ("[compile]\nseq-len = 64\nseq_len = 32\n", "[compile] seq_len: given twice (also as 'seq-len')"),
    ("[compile]\nseq-len = \n", "not valid TOML: Invalid value (at line 2, column 11)"),
    ("[compile]\ncoc-parallel-num = 3\n", "--coc-parallel-num must be one of 1, 2, 4, 8, got 3"),  # as a flag's
])
def test_bad_files_are_one_line_and_write_nothing(tmp_path: Path, capsys, text: str, needle: str) -> None:
    path = tmp_path / "job.toml"
    path.write_text(text)
    out = tmp_path / "art"
    assert main(["compile", "--config", str(path), "--out", str(out), "--backend", "eager"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_missing_file_wrong_suffix_and_missing_required_flag(tmp_path: Path) -> None:
    with pytest.raises(GraphllmError, match="--config .*nope.toml: cannot read it"):
        _parsed(["compile", "--out", "x", "--config", str(tmp_path / "nope.toml")])
    (tmp_path / "job.ini").write_text("[compile]\n")
    with pytest.raises(GraphllmError, match="name a .toml, .yaml or .yml file"):
        _parsed(["compile", "--out", "x", "--config", str(tmp_path / "job.ini")])
    (tmp_path / "job.yaml").write_text("compile: [1\n")
    with pytest.raises(GraphllmError, match=r"not valid YAML: .*\(line 2, column 1\)"):
        _parsed(["compile", "--config", str(tmp_path / "job.yaml")])
    (tmp_path / "run.toml").write_text("[run]\nsteps = 2\n")
    with pytest.raises(GraphllmError, match="graphllm compile needs --out: give it on the command line or as out"):
        _parsed(["compile", "--config", str(tmp_path / "run.toml")])


def test_invocation_records_values_sources_command_line_and_commit(job_file: Path) -> None:
    args = _parsed(["compile", "--config", str(job_file), "--seq-len", "32"])
    args.command_line = "graphllm compile --config job --seq-len 32"
    record = invocation(args, from_flags(CompilePlan, args))
    assert record["command_line"] == args.command_line and record["config_file"] == str(job_file.resolve())
    opts = record["options"]
    assert opts["--seq-len"] == {"value": 32, "source": "command line"}
    assert opts["--disable"] == {"value": ["fuse_rope", "fuse_swiglu"], "source": "file"}
    assert opts["--out"] == {"value": "from-file", "source": "file"}
    assert opts["--recompute-method"] == {"value": None, "source": "default"}
    assert len(opts) == len([d for d in declared(CompilePlan) if d.option.cli]) + 3  # + --out --dry-run --torch-npu-wheel
    if (ROOT / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", record["git_commit"] or ""), record["git_commit"]


def test_no_git_means_no_commit_not_a_failure(monkeypatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    source_commit.cache_clear()
    try:
        assert source_commit() is None
    finally:
        source_commit.cache_clear()


def test_compile_and_run_from_a_file_record_the_invocation(tmp_path: Path, tiny_artifact: Path, capsys) -> None:
    job = tmp_path / "job.toml"
    out = tmp_path / "art"
    job.write_text(f'[compile]\nmodel = "tiny-llama"\nbackend = "eager"\nbatch-size = 2\nseq-len = 16\n'
                   f'out = "{out}"\n[run]\nsteps = 1\nrun-name = "job-config"\nno-progress = true\n')
    assert main(["compile", "--config", str(job), "--seq-len", "32"]) == 0
    recorded = json.loads((out / "invocation.json").read_text())
    assert recorded["command_line"] == f"graphllm compile --config {job} --seq-len 32"
    assert recorded["options"]["--seq-len"] == {"value": 32, "source": "command line"}
    assert recorded["options"]["--batch-size"] == {"value": 2, "source": "file"}
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert f"compiled by: graphllm compile --config {job} --seq-len 32" in capsys.readouterr().out
    assert main(["run", str(tiny_artifact), "--config", str(job)]) == 0  # [compile] is not read by run
    header = json.loads((tiny_artifact / "runs" / "job-config" / "metrics.jsonl").read_text().splitlines()[0])
    assert header["event"] == "start" and header["train"]["steps"] == 1
    assert header["invocation"]["options"]["--run-name"] == {"value": "job-config", "source": "file"}
    assert header["invocation"]["options"]["--lr"]["source"] == "default"
    assert header["invocation"]["command_line"] == f"graphllm run {tiny_artifact} --config {job}"
