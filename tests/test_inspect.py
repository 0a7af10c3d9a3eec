"""`graphllm inspect`: op histogram, node search and the HTML rendering of one graph (actually rendered
and parsed), plus its bad input (exit 2, one line)."""

from __future__ import annotations

from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest
from graphllm.cli.main import EXIT_USER_ERROR, main

from graphllm.dump import TABLE_COLUMNS

FAST = ["--backend", "eager", "--batch-size", "2", "--seq-len", "32"]


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # rich tables on one line per row, so tests can split them


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("art") / "tiny"
    assert main(["compile", "--model", "tiny-llama", "--out", str(out), *FAST]) == 0
    return out


def _rows(artifact: Path, graph: str) -> list[dict[str, str]]:
    path = next((artifact / "graphs" / "rank0").rglob(f"{graph}.tsv"))
    lines = path.read_text().splitlines()
    return [dict(zip(lines[0].split("\t"), line.split("\t"))) for line in lines[1:]]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, f"expected one error line, got: {err}"
    return err[0]


def test_tsv_lists_each_nodes_inputs(artifact: Path) -> None:
    rows = _rows(artifact, "07_lower_ops")
    assert tuple(rows[0]) == TABLE_COLUMNS and TABLE_COLUMNS[-1] == "inputs"
    names = {r["name"] for r in rows}
    attention = [r for r in rows if r["target"] == "graphllm.attention.default"]
    assert attention and all(set(r["inputs"].split(",")) <= names for r in attention)
    assert all(r["inputs"] == "" for r in rows if r["op"] in ("placeholder", "get_attr"))


def test_ops_histogram_counts_match_the_graph(artifact: Path, capsys) -> None:
    assert main(["inspect", str(artifact), "--ops", "lower_ops"]) == 0
    out = capsys.readouterr().out
    counts = Counter(r["target"] for r in _rows(artifact, "07_lower_ops") if r["op"] == "call_function")
    assert counts["graphllm.attention.default"] == 4  # one per layer of tiny-llama
    table = _tsv(out)  # not a terminal: tab-separated lines (cli/console.py)
    assert table[0] == ["op", "count"]
    assert dict(table[1:]) == {target: str(n) for target, n in counts.items()}
    assert table[1][0] == "aten.linear.default"  # most frequent first: 4 layers x 7 projections + lm_head
    assert main(["inspect", str(artifact), "--ops", "backward"]) == 0
    assert "aten.mm.default" in capsys.readouterr().out


def _tsv(out: str) -> list[list[str]]:
    """A redirected table's rows, its header first (the `# title` line left out)."""
    return [line.split("\t") for line in out.splitlines() if "\t" in line and not line.startswith("# ")]


def _find(artifact: Path, capsys, *args: str) -> list[list[str]]:
    assert main(["inspect", str(artifact), "--find", *args]) == 0
    return _tsv(capsys.readouterr().out)[1:]


def test_find_by_op_module_and_source_line(artifact: Path, capsys) -> None:
    by_op = _find(artifact, capsys, "ATTENTION.default", "--in", "fuse_attention")
    assert len(by_op) == 4 and {r[0] for r in by_op} == {"05_fuse_attention"}
    everywhere = _find(artifact, capsys, "graphllm.swiglu")
    assert {r[0] for r in everywhere} >= {"03_fuse_swiglu", "04_fuse_rope", "07_lower_ops"}
    by_module = _find(artifact, capsys, "lm_head", "--in", "7")
    assert by_module and all(r[0] == "07_lower_ops" for r in by_module)
    line = next(r["source"] for r in _rows(artifact, "07_lower_ops") if r["target"] == "graphllm.attention.default")
    by_source = _find(artifact, capsys, line, "--in", "lower_ops")
    assert any(r[1].startswith("attention_default") for r in by_source)
    assert _find(artifact, capsys, "no_such_op_anywhere") == []


class _Svg(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: Counter[str] = Counter()
        self.nodes: list[dict[str, str]] = []
        self.edges = 0
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags[tag] += 1
        if tag == "g" and "node" in a.get("class", "").split():
            self.nodes.append(a)
        if "edge" in a.get("class", "").split():
            self.edges += 1
        if tag in ("script", "link", "img", "iframe") or a.get("src"):
            self.external.append(tag)


def test_render_html_draws_every_node_and_edge(artifact: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "attn.html"
    assert main(["inspect", str(artifact), "--render", "fuse_attention", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    page = out.read_text()
    parser = _Svg()
    parser.feed(page)
    parser.close()
    rows = _rows(artifact, "05_fuse_attention")
    sources = {r["name"] for r in rows if r["op"] in ("placeholder", "get_attr")}
    refs = [i for r in rows for i in r["inputs"].split(",") if i and i not in sources]
    assert parser.tags["svg"] == 1 and parser.external == []
    assert len(parser.nodes) == len(rows)
    assert parser.edges >= len(refs) > 0
    created = [r["name"] for r in rows if r["pass"] == "fuse_attention"]
    assert len(created) == 4
    assert sorted(n["id"].removeprefix("n-") for n in parser.nodes if "created" in n["class"]) == sorted(created)
    assert all(name in page for name in created)
    assert "shape: [" in page and "source: models/llama.py:" in page  # hover titles


def test_render_backward_graph(artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "bw.html"
    assert main(["inspect", str(artifact), "--render", "backward", "--out", str(out)]) == 0
    parser = _Svg()
    parser.feed(out.read_text())
    assert len(parser.nodes) == len(_rows(artifact, "backward"))


@pytest.mark.parametrize("argv, needle", [
    (["--ops", "fuse_everything"], "no graph named 'fuse_everything'"),
    (["--find", "x", "--in", "nope"], "no graph named 'nope'"),
    (["--in", "forward"], "--in GRAPH only narrows --find"),
    (["--render", "forward"], "--render GRAPH and --out FILE go together"),
    (["--render", "forward", "--out", "{tmp}/g.png"], "--out must end in .html or .svg"),
    (["--render", "forward", "--out", "{tmp}/no/dir/g.html"], "does not exist"),
])
def test_bad_input_is_one_line_exit_2(artifact: Path, tmp_path: Path, argv, needle, capsys) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["inspect", str(artifact), *argv]) == EXIT_USER_ERROR
    assert needle in _error_line(capsys)


def test_missing_artifact_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["inspect", str(tmp_path / "missing"), "--ops", "forward"]) == EXIT_USER_ERROR
    assert "does not exist" in _error_line(capsys)
