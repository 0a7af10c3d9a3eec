"""Reading a Megatron-LM / MindSpeed-LLM launch script without running it.

A launch script is bash: assignments (`TP=2`, `GPT_ARGS="--tensor-model-parallel-size ${TP} ..."`, `export X=1`),
line continuations, then `torchrun $DISTRIBUTED_ARGS pretrain_gpt.py $GPT_ARGS ...` (or `python pretrain_gpt.py`,
`python -m torch.distributed.launch`). `read_script` follows it line by line as bash would expand it, but nothing
is executed: `$NAME`, `${NAME}`, `${NAME:-default}` and `$((arithmetic))` are expanded from the script's own
assignments (arithmetic by walking its syntax tree: integers and + - * / % only); every other expansion —
a variable the script does not assign, `$(command)`, backticks, `$1` — stays as literal text and is reported.
Other commands (`source`, `mkdir`, `rm`, whatever follows `;`) are read past, never run. Quoting follows bash:
single quotes expand nothing, double quotes keep one word, an unquoted value is split into words.

What the launch line's flags mean in graphllm is graphllm/megatron_flags.py.
"""

from __future__ import annotations

import ast
import operator
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from graphllm.errors import GraphllmError

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ASSIGNMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.S)
PARAMETER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(:?[-=+])?(.*)", re.S)
LAUNCHERS = ("torchrun", "deepspeed", "torch.distributed.launch", "torch.distributed.run")
WRAPPERS = ("then", "else", "elif", "do", "{", "!", "time", "nohup", "exec", "if", "while", "until")
DECLARES = ("export", "declare", "local", "readonly", "typeset")
REDIRECT = re.compile(r"^\d*(>>?|<|>&|&>)")
ASCEND = re.compile(r"ascend|hccl|mindspeed|\bnpu\b|torch_npu", re.I)
"""Words that mark a MindSpeed-LLM script for Ascend NPUs (its set_env.sh, HCCL_* settings, mindspeed flags)."""
ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.floordiv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}


@dataclass
class Script:
    """What a launch script asks for: the launch command's words, split at the Python program."""

    path: Path
    variables: dict[str, str] = field(default_factory=dict)
    launcher: list[str] = field(default_factory=list)
    """The words before the program: `torchrun --nproc_per_node 8 ...`, `python`, `python -m torch.distributed.launch`."""
    program: str = ""
    args: list[str] = field(default_factory=list)
    """The program's arguments (the Megatron flags), redirections and pipes left off."""
    unexpanded: list[str] = field(default_factory=list)
    """Expansions left as text (in order of first appearance): unassigned variables, `$(...)`, backticks."""
    launches: int = 0
    """Launch commands found: the last one whose program's name holds "train" is translated, else the last."""
    ascend: bool = False


def read_script(path: Path) -> Script:
    """The launch command of the bash script at `path`, its variables expanded (module docstring); never runs it."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise GraphllmError(f"{path}: cannot read the launch script ({getattr(e, 'strerror', None) or e})") from None
    script = Script(path=path, ascend=bool(ASCEND.search(text)))
    for line in _logical_lines(text):
        for command in _split_commands(line)[0]:
            _follow(script, command)
    if not script.launches:
        raise GraphllmError(f"{path}: no launch command found (a `torchrun ... X.py` or `python X.py ...` line); "
                            "give the script that starts training")
    return script


def _logical_lines(text: str) -> list[str]:
    """Lines with continuations and multi-line quoted strings joined; here-document bodies left out."""
    lines, heredoc, pending = [], None, ""
    for line in text.replace("\r\n", "\n").replace("\\\n", " ").split("\n"):
        if heredoc is not None:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        pending = f"{pending}\n{line}" if pending else line
        if _split_commands(pending)[1]:  # a quoted string goes on
            continue
        m = re.search(r"<<-?\s*['\"]?(\w+)", pending)
        heredoc = m.group(1) if m else None
        lines.append(pending)
        pending = ""
    return lines + ([pending] if pending else [])


def _quoting(text: str, i: int, quote: str | None) -> tuple[str, int, str | None] | None:
    """At a backslash escape or a quote character: (its text, the next index, the quoting after it); else None."""
    c = text[i]
    if c == "\\" and quote != "'":
        return text[i:i + 2], i + 2, quote
    if c in "'\"" and quote in (None, c):
        return c, i + 1, None if quote == c else c
    return None


def _split_commands(line: str) -> tuple[list[str], bool]:
    """(`line` cut at `;`, `&&`, `||`, `|`, `&` outside quotes and `$(...)`, a `#` comment dropped; whether it
    ends inside a quoted string)."""
    out, cur, quote, depth, i = [], [], None, 0, 0
    while i < len(line):
        c = line[i]
        if (step := _quoting(line, i, quote)) is not None:
            cur.append(step[0])
            _, i, quote = step
            continue
        if quote is None and depth == 0 and c == "#" and (not cur or cur[-1][-1:].isspace()):
            break
        if quote != "'" and line.startswith("$(", i):
            depth += 1
        elif quote != "'" and depth and c == ")":
            depth -= 1
        elif quote is None and depth == 0 and c in ";|&" and not _redirection_amp(line, i):
            out.append("".join(cur))
            cur = []
            i += 2 if line.startswith(("&&", "||"), i) else 1
            continue
        cur.append(c)
        i += 1
    out.append("".join(cur))
    return [c.strip() for c in out if c.strip()], quote is not None


def _redirection_amp(line: str, i: int) -> bool:
    """Whether the `&` at `i` belongs to a redirection (`2>&1`, `&>log`)."""
    return line[i] == "&" and (line[i - 1:i] == ">" or line[i + 1:i + 2] == ">")


def _follow(script: Script, command: str) -> None:
    """Expand one command with the variables known so far; record an assignment, or a launch."""
    try:
        words = shlex.split(_expand(command, script))
    except ValueError:  # an unclosed quote: bash would fail on it too
        return
    while words and words[0] in WRAPPERS:
        words = words[1:]
    declare = bool(words) and words[0] in DECLARES
    words = [w for w in words[1:] if not w.startswith("-")] if declare else words
    assigned = []
    while words and (m := ASSIGNMENT.fullmatch(words[0])):
        assigned.append(m.groups())
        words = words[1:]
    if not words or declare:  # `A=1`, `export A=1 B=2`; `A=1 cmd` sets A for cmd alone
        script.variables.update((k, v) for k, v in assigned if declare or not words)
        return
    start = next((i for i, w in enumerate(words) if Path(w).name.startswith("python") or Path(w).name in LAUNCHERS
                  or w in LAUNCHERS), None)
    end = next((i for i, w in enumerate(words) if w.endswith(".py") and i > (start or 0)), None)
    if start is None or end is None or words[0] in ("echo", "printf"):
        return
    script.launches += 1
    if "train" not in Path(script.program).name or "train" in Path(words[end]).name:
        args = words[end + 1:]
        cut = next((i for i, w in enumerate(args) if REDIRECT.match(w)), len(args))
        script.launcher, script.program, script.args = words[start:end], words[end], args[:cut]


def split_flags(words: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """{flag: values} in order (`--flag=v` split; a later repeat wins, as in argparse) and the words before any flag."""
    flags: dict[str, list[str]] = {}
    stray: list[str] = []
    current = None
    for word in words:
        if word.startswith("--"):
            current, _, value = word.partition("=")
            flags.pop(current, None)
            flags[current] = [value] if value else []
        elif current is None:
            stray.append(word)
        else:
            flags[current].append(word)
    return flags, stray


def launcher_ranks(script: Script) -> tuple[int | None, int | None]:
    """(ranks per node, nodes) the launch line starts: torchrun / torch.distributed.launch / deepspeed flags (their
    defaults 1), 1 × 1 for a plain `python X.py`; None where the script does not say (an unset variable)."""
    launcher = script.launcher
    if launcher and Path(launcher[0]).name.startswith("python") and "-m" not in launcher:
        return 1, 1
    flags, _ = split_flags([w.replace("_", "-") if w.startswith("--") else w for w in launcher[1:]])
    sizes = []
    for names in (("--nproc-per-node", "--num-gpus"), ("--nnodes", "--num-nodes")):
        values = next((flags[n] for n in names if n in flags), ["1"])
        sizes.append(int(values[0]) if len(values) == 1 and values[0].isdigit() else None)
    return sizes[0], sizes[1]


# -- expansion -------------------------------------------------------------------------------------------------
def _expand(text: str, script: Script) -> str:
    """`text` with the script's variables substituted, quoted so that shlex reads the words bash would."""
    out, quote, i = [], None, 0
    while i < len(text):
        c = text[i]
        if (step := _quoting(text, i, quote)) is not None:
            out.append(step[0])
            _, i, quote = step
            continue
        if c in "$`" and quote != "'":
            end, value = _substitution(text, i, script)
            if value is None:  # left as literal text, one word
                value = text[i:end]
                if value not in script.unexpanded:
                    script.unexpanded.append(value)
                out.append(value.replace("\\", "\\\\").replace('"', '\\"') if quote else shlex.quote(value))
            elif quote:
                out.append(value.replace("\\", "\\\\").replace('"', '\\"'))
            else:  # unquoted: split into words, each literal
                out.append(" ".join(shlex.quote(w) for w in value.split()))
            i = end
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _closing(text: str, i: int, opening: str, closing: str) -> int:
    """Index just past the `closing` that balances the `opening` at `i` (len(text) when unbalanced)."""
    depth = 0
    for j in range(i, len(text)):
        depth += text.startswith(opening, j)
        if text.startswith(closing, j):
            depth -= 1
            if depth == 0:
                return j + len(closing)
    return len(text)


def _substitution(text: str, i: int, script: Script) -> tuple[int, str | None]:
    """(end, value) of the expansion starting at `i`; value None when it cannot be known without running."""
    env = script.variables
    if text[i] == "`":
        end = text.find("`", i + 1)
        return (len(text) if end < 0 else end + 1), None
    if text.startswith("$((", i):
        end = _closing(text, i + 1, "((", "))")
        return end, _arithmetic(text[i + 3:end - 2], script)
    if text.startswith("$(", i):
        return _closing(text, i + 1, "(", ")"), None
    if text.startswith("${", i):
        end = _closing(text, i + 1, "{", "}")
        m = PARAMETER.fullmatch(text[i + 2:end - 1])
        if m is None:
            return end, None
        name, op, word = m.groups()
        known = name in env and (env[name] != "" or not (op or "").startswith(":"))
        if op is None:
            return end, env[name] if name in env and not word else None
        if op.endswith("+"):
            return end, (_expand_word(word, script) if known else "")
        if known:
            return end, env[name]
        value = _expand_word(word, script)
        if op.endswith("="):
            env[name] = value
        return end, value
    m = NAME.match(text, i + 1)
    if m is None:
        special = i + 1 < len(text) and (text[i + 1].isdigit() or text[i + 1] in "@*#?$!-")
        return (i + 2, None) if special else (i + 1, "$")
    return m.end(), env.get(m.group())


def _expand_word(word: str, script: Script) -> str:
    """A `${NAME:-word}` default, expanded and with its quotes removed."""
    try:
        return " ".join(shlex.split(_expand(word, script)))
    except ValueError:
        return word


def _arithmetic(expr: str, script: Script) -> str | None:
    """`$((expr))` over integers (+ - * / %), variables from the script; None for anything else."""
    env = script.variables
    expr = _expand(expr, script).replace("'", "")
    expr = NAME.sub(lambda m: env.get(m.group(), m.group()), expr)
    try:
        return str(_evaluate(ast.parse(expr.strip(), mode="eval").body))
    except (SyntaxError, ValueError, ZeroDivisionError):
        return None


def _evaluate(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in ARITHMETIC:
        return ARITHMETIC[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    raise ValueError(f"not integer arithmetic: {ast.dump(node)}")
