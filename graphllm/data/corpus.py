"""The built-in training corpus: prose from the installed Python's standard library.

No downloads: the text is gathered at run time by parsing (never importing) the `.py` sources under
`sysconfig.get_paths()["stdlib"]`. Each file gives, in source order:

* module, class and function docstrings (`ast`, `inspect.cleandoc`), and
* blocks of consecutive `#` comment lines (`tokenize`), which roughly double the text: docstrings
  alone give ~1.6 MB on CPython 3.11, short of the several MB a tokenizer and a smoke-test model want.

plus the language reference topics that ship as string constants in `pydoc_data/topics.py`.
Pieces under `MIN_DOC_CHARS` are dropped. Paths are walked in sorted order and every step is
deterministic, so one Python version always yields the same documents. The result is cached as one
UTF-8 text file keyed by the full Python version (patch releases edit docstrings) and `CORPUS_FORMAT`.
"""

from __future__ import annotations

import ast
import inspect
import io
import os
import sys
import sysconfig
import tokenize
import warnings
from pathlib import Path

from graphllm.data.cache import atomic_write, cache_dir
from graphllm.errors import GraphllmError

MIN_DOC_CHARS = 40  # shorter docstrings ("Return self.") are mostly boilerplate
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
                       "__pycache__"})
# Separates documents in the cache file. The form feed + record separator pair never occurs in a
# cleaned docstring (checked when the file is written).
SENTINEL = "\n\x0c\x1e\n"
CORPUS_FORMAT = 1  # bump when the extraction rules change, so old caches are not reused


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_tag() -> str:
    """Names this interpreter's corpus in cache file names, e.g. "py3.11.7-c1"."""
    v = sys.version_info
    return f"py{v.major}.{v.minor}.{v.micro}-c{CORPUS_FORMAT}"


def stdlib_sources(root: Path | None = None) -> list[Path]:
    """The `.py` files under the stdlib root, sorted, skipping tests, IDLE, lib2to3 and site-packages."""
    root = root or stdlib_root()
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(found)


def _docstrings(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, text) of module, class and function docstrings."""
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    docs = []
    for node in nodes:
        doc = ast.get_docstring(node, clean=False)
        if doc:
            docs.append((getattr(node, "lineno", 0), inspect.cleandoc(doc)))
    return docs


def _comment_blocks(source: bytes) -> list[tuple[int, str]]:
    """(first line, text) of each run of `#` comments on consecutive lines, `#` marks removed.

    Shebang and coding lines are skipped. Raises tokenize.TokenError / SyntaxError on broken files.
    """
    blocks: list[tuple[int, str]] = []
    lines: list[str] = []
    first = last = -2
    for tok in tokenize.tokenize(io.BytesIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        row = tok.start[0]
        if tok.string.startswith("#!") or "-*- coding" in tok.string or "vim:" in tok.string:
            continue
        if row != last + 1 and lines:
            blocks.append((first, inspect.cleandoc("\n".join(lines))))
            lines = []
        if not lines:
            first = row
        lines.append(tok.string.lstrip("#").rstrip())
        last = row
    if lines:
        blocks.append((first, inspect.cleandoc("\n".join(lines))))
    return blocks


def _pydoc_topics(tree: ast.Module) -> list[str]:
    """The values of `topics = {...}` in pydoc_data/topics.py, by sorted key."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
            return [inspect.cleandoc(topics[k]) for k in sorted(topics)]
    return []


def extract_documents(root: Path | None = None) -> list[str]:
    """Parse every stdlib source and return its prose; files that fail to read/parse are skipped."""
    documents: list[str] = []
    for path in stdlib_sources(root):
        try:
            source = path.read_bytes()
            with warnings.catch_warnings():  # old escape sequences in some sources warn on parse
                warnings.simplefilter("ignore")
                tree = ast.parse(source, filename=str(path))
            pieces = sorted(_docstrings(tree) + _comment_blocks(source))
            if path.parent.name == "pydoc_data" and path.name == "topics.py":
                pieces += [(0, t) for t in _pydoc_topics(tree)]
        except (SyntaxError, ValueError, OSError, UnicodeDecodeError, tokenize.TokenError):
            continue
        documents.extend(text for _, text in pieces if len(text) >= MIN_DOC_CHARS and SENTINEL not in text)
    return documents


def corpus_path() -> Path:
    return cache_dir("corpus") / f"stdlib-text-{corpus_tag()}.txt"


def builtin_documents() -> list[str]:
    """The built-in corpus: one docstring, comment block or reference topic per document; cached."""
    path = corpus_path()
    if not path.exists():
        documents = extract_documents()
        if not documents:
            raise GraphllmError(f"found no Python sources with docstrings under {stdlib_root()}; this "
                                f"interpreter ships without its standard library .py files, so the built-in "
                                f"corpus is unavailable: use a full CPython install or your own token ids")
        atomic_write(path, SENTINEL.join(documents).encode("utf-8"))
        return documents
    return path.read_text(encoding="utf-8").split(SENTINEL)
