"""`graphllm convert-args SCRIPT`: a Megatron-LM / MindSpeed-LLM launch script → the equivalent `graphllm compile`
and `graphllm run` commands (or a job file for `--config`), and every flag not translated with the reason.

The script is read, never run (graphllm/launch_script.py). The output is plain text — a shell script or a TOML
file whose notes are comments — the same at a terminal and redirected.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("convert-args", help="translate a Megatron-LM / MindSpeed-LLM launch script into graphllm "
                                            "commands or a job file (the script is never run)",
                       description="Reads SCRIPT's variable assignments and its torchrun/python line (without running "
                                   "anything) and prints the graphllm compile and run commands that do the same, then "
                                   "the flags it did not translate and why (docs/config_files.md).")
    p.add_argument("script", type=Path, help="the bash launch script (e.g. pretrain_llama2_7b_ptd.sh)")
    p.add_argument("--format", choices=("commands", "toml"), default="commands",
                   help="commands: graphllm compile / run command lines; toml: a job file for --config")
    p.add_argument("--artifact", metavar="DIR", default=None,
                   help="the artifact directory the commands use (default: build/<script name>)")
    p.add_argument("--out", type=Path, metavar="FILE", help="write to FILE instead of stdout")
    p.add_argument("--force", action="store_true", help="with --out: replace an existing FILE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from graphllm.errors import GraphllmError
    from graphllm.launch_script import read_script
    from graphllm.megatron_flags import translate

    if args.out is not None and args.out.exists() and not args.force:
        raise GraphllmError(f"--out {args.out} exists; choose another file or add --force to replace it")
    job = translate(read_script(args.script))
    artifact = args.artifact or f"build/{args.script.stem}"
    text = (render_toml if args.format == "toml" else render_commands)(job, artifact, args.out)
    if args.out is None:
        sys.stdout.write(text)
        return 0
    tmp = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, args.out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise GraphllmError(f"--out {args.out}: cannot write it ({e.strerror or e})") from None
    print(f"wrote {args.out}; {len(job.untranslated)} flags not translated (listed in it)", file=sys.stderr)
    return 0


# -- the output: plain text, a shell script or a TOML job file, its report as comments ---------------------------
def _options(job) -> list[tuple[str, object, object]]:
    """(command, Declared, value) of the translated options, in graphllm's declaration order."""
    from graphllm.options import declared
    from graphllm.plan import CompilePlan
    from graphllm.run_config import RunConfig

    return [(command, d, values[d.path]) for command, cls, values in
            (("compile", CompilePlan, job.compile), ("run", RunConfig, job.run))
            for d in declared(cls) if d.path in values]


def _words(d, value) -> list[str]:
    """The command-line words of one option."""
    if value is True:
        return [d.flag]
    if d.option.nargs:
        return [d.flag, *map(str, value)]
    if isinstance(value, (list, tuple)):
        return [d.flag, ",".join(map(str, value))]
    return [d.flag, repr(value) if isinstance(value, float) else str(value)]


def _refusals(job) -> list[str]:
    """What graphllm would refuse in the translated options (its own checks, one line each)."""
    from graphllm.errors import GraphllmError
    from graphllm.options import build
    from graphllm.plan import CompilePlan
    from graphllm.run_config import RunConfig

    out = []
    for command, cls, values in (("compile", CompilePlan, job.compile), ("run", RunConfig, job.run)):
        try:
            build(cls, values)
        except GraphllmError as e:
            out.append(f"graphllm {command} will refuse this: {e}")
    return out


def _report(job) -> list[str]:
    """The comment lines after the commands: notes, flags read from the model or needing none, the flags not
    translated and why, the expansions left as text."""
    several = job.nnodes not in (None, 1)
    nodes = [f"{job.nnodes} nodes: run each command on every node (docs/parallelism.md)"] if several else []
    lines = ["", "# notes:"] + [f"#   {n}" for n in _refusals(job) + nodes + job.notes]
    if job.from_model:
        lines.append(f"# read from --model's config.json instead: {', '.join(job.from_model)}")
    if job.no_flag:
        lines += ["# need no graphllm flag:"] + [f"#   {flag}: {why}" for flag, why in job.no_flag]
    lines.append(f"# not translated ({len(job.untranslated)}):")
    lines += [f"#   {s.flag}: {s.kind} ({s.why})" for s in job.untranslated]
    if job.script.unexpanded:
        lines.append("# left unexpanded (not set in the script; nothing in it was run): "
                     + ", ".join(job.script.unexpanded))
    return lines + [""]


def _header(job, what: str) -> str:
    return (f"# {what} for {job.script.path.name}, translated by `graphllm convert-args` "
            f"(the script was read, not run; {job.script.launches} launch line(s), from {job.script.program})")


def _launcher(job) -> list[str]:
    """`graphllm`, or on several nodes the torchrun line to run on each (docs/parallelism.md)."""
    if job.nnodes in (None, 1):
        return ["graphllm"]
    from graphllm.launch_script import split_flags

    given, _ = split_flags([w.replace("_", "-") if w.startswith("--") else w for w in job.script.launcher])
    host, port = ((given.get(f) or [None])[0] or job.script.variables.get(v, d)
                  for f, v, d in (("--master-addr", "MASTER_ADDR", "HOST"), ("--master-port", "MASTER_PORT", "29500")))
    endpoint = f"{host}:{port}"
    return ["torchrun", "--nnodes", str(job.nnodes), "--nproc-per-node", str(job.nproc_per_node),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "-m", "graphllm"]


def render_commands(job, artifact: str, out: Path | None = None) -> str:
    """The `graphllm compile` and `graphllm run` command lines (one flag a line), then the report."""
    import shlex

    lines = [_header(job, "graphllm commands")]
    for command in ("compile", "run"):
        head = [*_launcher(job), command] + ([artifact] if command == "run" else [])
        flags = [shlex.join(_words(d, v)) for c, d, v in _options(job) if c == command]
        flags += [shlex.join(["--out", artifact])] if command == "compile" else []
        lines.append(" \\\n    ".join([shlex.join(head), *flags]))
    return "\n".join(lines + _report(job))


def _toml(value) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_toml, value)) + "]"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def render_toml(job, artifact: str, out: Path | None = None) -> str:
    """A job file for `graphllm compile --config` / `graphllm run --config`, then the report as comments."""
    name = out.name if out is not None else "job.toml"
    import shlex

    start = shlex.join(_launcher(job))
    lines = [_header(job, "graphllm job file"),
             f"#   {start} compile --config {name} && {start} run {artifact} --config {name}"]
    for command in ("compile", "run"):
        lines += ["", f"[{command}]"]
        lines += [f"{d.flag[2:]} = {_toml(v)}" for c, d, v in _options(job) if c == command]
        lines += [f"out = {_toml(artifact)}"] if command == "compile" else []
    return "\n".join(lines + _report(job))
