"""Job files (`--config job.toml|yaml`) and the record of how a command was invoked.

A job file has one section per command (`[compile]`, `[run]`; other sections are ignored). Its keys are the
command's flag names without the dashes (`seq-len` or `seq_len`), its values typed as the flag expects (lists for
list flags, true/false for switches). Flags given on the command line win over the file.

`add_config_flag(parser, section)` gives a command `--config FILE`; the CLI calls `apply_config` on the parsed
arguments of every command, which reads the file's section into the namespace: declared options (graphllm/options.py)
through `FILE_VALUES`, which `from_flags` reads, the command's other flags (`--out`, `--nproc`) as attributes.
Every flag of the command works from a file without code of its own. An unknown key (with the nearest flag), a
wrongly-typed value, a missing or unparseable file: one line (GraphllmError), before anything is written.

`invocation(args, *configs)` is what an artifact (invocation.json) and a run's metrics header record: every flag's
final value and where it came from (default, file, command line), the command line and graphllm's git commit.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

from graphllm.errors import GraphllmError
from graphllm.options import FILE_VALUES, declared, value_from_file

SECTION = "config:section"
REQUIRED = "config:required"
SOURCES = "config:sources"
COMMAND_ENV = "GRAPHLLM_COMMAND_LINE"
"""The user's command line, passed to the ranks a command starts (theirs is `python -m graphllm ...`)."""
GIT_TIMEOUT_S = 5
"""Each git call's limit: a slow or hung git must not hold up a compile."""
SKIPPED = ("-h", "--help", "--config")


def add_config_flag(parser: argparse.ArgumentParser, section: str) -> None:
    """`--config FILE` for the command whose job-file section is `section`. Its required flags may then come
    from the file: argparse stops requiring them and `apply_config` checks them after reading it."""
    required = [a.option_strings[0] for a in parser._actions if a.required and a.option_strings]
    for a in parser._actions:
        if a.option_strings and a.required:
            a.required = False
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help=f"a TOML or YAML job file whose [{section}] section sets this command's flags (key = "
                             "value, the flag without its dashes); flags given here win (docs/config_files.md)")
    parser.set_defaults(**{SECTION: section, REQUIRED: required})


def load_section(path: Path, section: str) -> dict[str, Any]:
    """The `section` table of a TOML (.toml) or YAML (.yaml, .yml) file; {} when the file has none."""
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise GraphllmError(f"--config {path}: name a .toml, .yaml or .yml file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise GraphllmError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    try:
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 (tomllib / yaml parse errors: one line with their position)
        mark = getattr(e, "problem_mark", None)  # yaml's: its message spans lines, with a drawing
        what = f"{e.problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else " ".join(str(e).split())
        raise GraphllmError(f"--config {path}: not valid {'TOML' if suffix == '.toml' else 'YAML'}: {what}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise GraphllmError(f"--config {path}: expected sections such as [{section}], got a {type(data).__name__}")
    table = data.get(section, {})
    if not isinstance(table, dict):
        raise GraphllmError(f"--config {path}: [{section}] must be a table of flag = value, got {table!r}")
    return table


def _flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """key (flag without dashes) -> action, for the command's long flags."""
    return {s[2:]: a for a in parser._actions for s in a.option_strings
            if s.startswith("--") and s not in SKIPPED}


def _given(args: argparse.Namespace, action: argparse.Action) -> bool:
    """Whether the command line gave the flag (its value is not argparse's default)."""
    return getattr(args, action.dest, None) != action.default


def apply_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Read `args.config`'s section into `args` for the flags the command line did not give; record each flag's
    source. A no-op for commands without --config."""
    section = getattr(args, SECTION, None)
    if section is None:
        return
    actions = _flag_actions(parser)
    sources = {key: "command line" if _given(args, a) else "default" for key, a in actions.items()}
    dests = {key: a.dest for key, a in actions.items()}
    file_values: dict[str, Any] = {}
    if args.config is not None:
        seen: dict[str, str] = {}
        for raw_key, value in load_section(args.config, section).items():
            key = str(raw_key).replace("_", "-")
            where = f"{args.config} [{section}] {raw_key}"
            if key not in actions:
                near = difflib.get_close_matches(key, list(actions), n=1)
                raise GraphllmError(f"{where}: not a flag of graphllm {section}"
                                    + (f"; did you mean {near[0]!r}?" if near else f"; see graphllm {section} --help"))
            if key in seen:
                raise GraphllmError(f"{where}: given twice (also as {seen[key]!r}); keep one")
            seen[key] = str(raw_key)
            action = actions[key]
            value = None if value is None else value_from_file(action, value, where)
            if value is None or sources[key] == "command line":
                continue
            sources[key] = "file"
            if action.dest.startswith("opt:"):  # a declared option: from_flags reads it (graphllm/options.py)
                file_values[action.dest] = value
            else:
                setattr(args, action.dest, value)
    setattr(args, FILE_VALUES, file_values)
    setattr(args, SOURCES, {key: (dests[key], source) for key, source in sources.items()})
    missing = [f for f in getattr(args, REQUIRED) if sources[f[2:]] == "default"]
    if missing:
        raise GraphllmError(f"graphllm {section} needs {' '.join(missing)}: give it on the command line or as "
                            f"{missing[0][2:]} = ... in the [{section}] section of --config FILE")


# -- what a command records -------------------------------------------------------------------------------------
def command_line(argv: list[str] | None) -> str:
    """The user's command line: passed down by the launcher (COMMAND_ENV), else this process's (`argv`: main's
    argument list when called from Python, which records it as `graphllm ...`)."""
    if os.environ.get(COMMAND_ENV):
        return os.environ[COMMAND_ENV]
    words = list(sys.argv) if argv is None else ["graphllm", *argv]
    if words and words[0].endswith(os.path.join("graphllm", "__main__.py")):
        words[:1] = [Path(sys.executable).name, "-m", "graphllm"]
    return shlex.join(words)


@contextlib.contextmanager
def command_line_for_ranks(line: str) -> Iterator[None]:
    """While starting ranks: they record `line` as their command line rather than torchrun's."""
    old = os.environ.get(COMMAND_ENV)
    os.environ[COMMAND_ENV] = line
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(COMMAND_ENV, None)
        else:
            os.environ[COMMAND_ENV] = old


def _git(package: Path, *argv: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(package), *argv], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return None
    return done.stdout if done.returncode == 0 else None


@functools.cache
def source_commit() -> str | None:
    """The git commit of graphllm's source checkout (`-dirty` with uncommitted changes); None when graphllm is
    not run from a checkout (an installed wheel) or git is missing or slow."""
    package = Path(__file__).resolve().parent
    out = _git(package, "rev-parse", "--show-toplevel", "HEAD")
    lines = out.split() if out else []
    if len(lines) != 2 or not (Path(lines[0]) / "pyproject.toml").is_file() or "site-packages" in package.parts:
        return None  # not graphllm's own checkout (e.g. a virtualenv inside some other repository)
    status = _git(package, "status", "--porcelain")
    return lines[1] + ("-dirty" if status and status.strip() else "")


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def invocation(args: argparse.Namespace | None, *configs: Any) -> dict[str, Any]:
    """How this command was invoked: its command line, graphllm's git commit, the job file and every flag's
    final value and source ({"--seq-len": {"value": 256, "source": "file"}}); `configs`: the configs built from
    the flags (their values are final: defaults filled in, checks applied). Without `args` (graphllm used from
    Python): the process's command line and the commit only."""
    record: dict[str, Any] = {"command_line": getattr(args, "command_line", None) or command_line(None),
                              "git_commit": source_commit()}
    if args is None or not hasattr(args, SOURCES):
        return record
    final = {"opt:" + ".".join(d.path): _value_at(c, d.path) for c in configs for d in declared(type(c))}
    options = {"--" + key: {"value": _plain(final[dest] if dest in final else getattr(args, dest, None)),
                            "source": source} for key, (dest, source) in getattr(args, SOURCES).items()}
    config = getattr(args, "config", None)
    return {**record, "config_file": str(config.resolve()) if config is not None else None, "options": options}


def _value_at(obj: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        obj = getattr(obj, name)
    return obj
