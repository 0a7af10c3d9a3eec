"""`graphllm inspect`: op histogram, node search and the HTML rendering of one graph (actually rendered
and parsed), plus its bad input (exit 2, one line)."""

from __future__ import annotations

import json
import re
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
    rows = _rows(artifact, "08_lower_ops")
    assert tuple(rows[0]) == TABLE_COLUMNS and TABLE_COLUMNS[-1] == "inputs"
    names = {r["name"] for r in rows}
    attention = [r for r in rows if r["target"] == "graphllm.attention.default"]
    assert attention and all(set(r["inputs"].split(",")) <= names for r in attention)
    assert all(r["inputs"] == "" for r in rows if r["op"] in ("placeholder", "get_attr"))


def test_ops_histogram_counts_match_the_graph(artifact: Path, capsys) -> None:
    assert main(["inspect", str(artifact), "--ops", "lower_ops"]) == 0
    out = capsys.readouterr().out
    counts = Counter(r["target"] for r in _rows(artifact, "08_lower_ops") if r["op"] == "call_function")
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
    assert {r[0] for r in everywhere} >= {"03_fuse_swiglu", "04_fuse_rope", "08_lower_ops"}
    by_module = _find(artifact, capsys, "lm_head", "--in", "8")
    assert by_module and all(r[0] == "08_lower_ops" for r in by_module)
    line = next(r["source"] for r in _rows(artifact, "08_lower_ops") if r["target"] == "graphllm.attention.default")
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
        self.drawn = 0  # elements inside the <svg>: what the browser draws
        self.closed = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags[tag] += 1
        if tag == "g" and "node" in a.get("class", "").split():
            self.nodes.append(a)
        if "edge" in a.get("class", "").split():
            self.edges += 1
        if tag in ("link", "img", "iframe", "object", "embed") or a.get("src"):  # inline <script> is fine
            self.external.append(tag)
        if self.tags["svg"] and not self.closed:
            self.drawn += 1

    def handle_endtag(self, tag: str) -> None:
        self.closed |= tag == "svg"


def _page(path: Path) -> tuple[_Svg, dict, str]:
    """A rendered page's parsed SVG, its embedded data and its text."""
    page = path.read_text()
    parser = _Svg()
    parser.feed(page)
    parser.close()
    data = json.loads(re.search(r'<script type="application/json" id="graph-data">(.*?)</script>', page, re.S)[1])
    return parser, data, page


def _view_box(page: str) -> tuple[int, int]:
    x, y, w, h = map(float, re.search(r'<svg id="graph"[^>]* viewBox="([^"]+)"', page)[1].split())
    return int(w), int(h)


def _self_contained(page: str, parser: _Svg) -> None:
    assert parser.external == []
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) <= {"http://www.w3.org/2000/svg"}
    assert not re.search(r"\b(fetch|XMLHttpRequest|import)\s*\(", page)


def test_render_html_draws_every_node_and_edge(artifact: Path, tmp_path: Path, capsys) -> None:
    """tiny-llama's 158 nodes fit on one page: it opens with every node drawn (expand=auto)."""
    out = tmp_path / "attn.html"
    assert main(["inspect", str(artifact), "--render", "fuse_attention", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    parser, data, page = _page(out)
    rows = _rows(artifact, "05_fuse_attention")
    sources = {r["name"] for r in rows if r["op"] in ("placeholder", "get_attr")}
    refs = [i for r in rows for i in r["inputs"].split(",") if i and i not in sources]
    assert parser.tags["svg"] == 1
    _self_contained(page, parser)
    assert len(parser.nodes) == len(rows) == len(data["nodes"])
    assert parser.edges >= len(refs) > 0
    created = [r["name"] for r in rows if r["pass"] == "fuse_attention"]
    assert len(created) == 4
    assert sorted(n["id"].removeprefix("n-") for n in parser.nodes if "created" in n["class"]) == sorted(created)
    assert all(name in page for name in created)
    assert "shape: [" in page and "source: models/attention.py:" in page  # hover titles


def test_render_backward_graph_by_layer(artifact: Path, tmp_path: Path) -> None:
    """The backward graph (866 nodes) opens with each decoder layer a box and layers 1-3 folded into
    one "×3" box; every node is in the page's data, and `--expand all` draws every one of them."""
    rows = _rows(artifact, "backward")
    out, full = tmp_path / "bw.html", tmp_path / "bw_all.html"
    assert main(["inspect", str(artifact), "--render", "backward", "--out", str(out)]) == 0
    assert main(["inspect", str(artifact), "--render", "backward", "--out", str(full), "--expand", "all"]) == 0
    parser, data, page = _page(out)
    assert sorted(data["strings"][n[0]] for n in data["nodes"]) == sorted(r["name"] for r in rows)
    assert 0 < len(parser.nodes) < 40 and parser.drawn < 300
    assert re.findall(r'class="badge"[^>]*>×(\d+)<', page) == ["3"]
    assert 'data-g=' in page and "layers.0" in page
    full_parser, _, full_page = _page(full)
    assert len(full_parser.nodes) == len(rows)
    _self_contained(full_page, full_parser)


@pytest.mark.parametrize("argv, needle", [
    (["--ops", "fuse_everything"], "no graph named 'fuse_everything'"),
    (["--find", "x", "--in", "nope"], "no graph named 'nope'"),
    (["--in", "forward"], "--in GRAPH only narrows --find"),
    (["--render", "forward"], "--render GRAPH and --out FILE go together"),
    (["--render", "forward", "--out", "{tmp}/g.png"], "--out must end in .html, .htm, .svg, .dot, .json"),
    (["--render", "forward", "--out", "{tmp}/g.dot", "--expand", "all"], "--expand all only sets the first view"),
    (["--render", "forward", "--out", "{tmp}/no/dir/g.html"], "does not exist"),
])
def test_bad_input_is_one_line_exit_2(artifact: Path, tmp_path: Path, argv, needle, capsys) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["inspect", str(artifact), *argv]) == EXIT_USER_ERROR
    assert needle in _error_line(capsys)


def test_missing_artifact_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["inspect", str(tmp_path / "missing"), "--ops", "forward"]) == EXIT_USER_ERROR
    assert "does not exist" in _error_line(capsys)


# ------------------------------------------------------------------------------- large graphs, exports

# A decoder layer's modules and how many ops each runs (~100 nodes a layer with its weights), the shape of
# a real llama layer: projections read their weight, attention reads q/k/v, residual adds sit in the layer.
_LAYER = (("input_layernorm", 4), ("self_attn.q_proj", 3), ("self_attn.k_proj", 3), ("self_attn.v_proj", 3),
          ("self_attn", 50), ("self_attn.o_proj", 3), ("post_attention_layernorm", 4), ("mlp.gate_proj", 3),
          ("mlp.up_proj", 3), ("mlp", 10), ("mlp.down_proj", 3))


def _llama_like_rows(layers: int, odd_layer: int = -1) -> list[dict[str, str]]:
    """A synthetic node table at real scale (SmolLM2-135M has 30 layers); `odd_layer` gets one op
    with another target, so it is no longer identical to the others."""
    rows: list[dict[str, str]] = []

    def add(name: str, op: str, target: str, module: str, inputs: list[str], shape: str = "[2,32,576]") -> str:
        rows.append({"idx": str(len(rows)), "name": name, "op": op, "target": target, "shape": shape,
                     "dtype": "float32", "pass": "capture" if op != "output" else "", "module": module,
                     "source": "models/attention.py:1" if op == "call_function" else "", "inputs": ",".join(inputs)})
        return name

    add("input_ids", "placeholder", "input_ids", "", [], "[2,32]")
    weighted = [sub for sub, _ in _LAYER if sub.endswith(("proj", "layernorm"))]
    for layer in range(layers):
        for sub in weighted:
            add(f"w{layer}_{sub.replace('.', '_')}", "get_attr", f"model.layers.{layer}.{sub}.weight", "", [], "[576]")
    x = add("embedding", "call_function", "aten.embedding.default", "model.embed_tokens", ["input_ids"])
    for layer in range(layers):
        def ops(sub: str, first: list[str]) -> str:
            prev = first + ([f"w{layer}_{sub.replace('.', '_')}"] if sub in weighted else [])
            for j in range(dict(_LAYER)[sub]):
                target = "aten.sin.default" if (layer, sub, j) == (odd_layer, "mlp", 1) else f"aten.op{j % 7}.default"
                prev = [add(f"l{layer}_{sub.replace('.', '_')}_{j}", "call_function", target,
                            f"model.layers.{layer}.{sub}", prev)]
            return prev[0]

        norm = ops("input_layernorm", [x])
        attn = ops("self_attn", [ops(f"self_attn.{p}_proj", [norm]) for p in "qkv"])
        h = add(f"l{layer}_add", "call_function", "aten.add.Tensor", f"model.layers.{layer}",
                [x, ops("self_attn.o_proj", [attn])])
        norm = ops("post_attention_layernorm", [h])
        mlp = ops("mlp", [ops("mlp.gate_proj", [norm]), ops("mlp.up_proj", [norm])])
        x = add(f"l{layer}_add_1", "call_function", "aten.add.Tensor", f"model.layers.{layer}",
                [h, ops("mlp.down_proj", [mlp])])
    add("norm_weight", "get_attr", "model.norm.weight", "", [], "[576]")
    x = add("norm", "call_function", "graphllm.rms_norm.default", "model.norm", [x, "norm_weight"])
    add("lm_head_weight", "get_attr", "lm_head.weight", "", [], "[49152,576]")
    x = add("lm_head", "call_function", "aten.linear.default", "lm_head", [x, "lm_head_weight"], "[2,32,49152]")
    add("output", "output", "output", "", [x], "")
    return rows


def test_thirty_layer_page_starts_small(tmp_path: Path) -> None:
    """30 identical layers of ~100 nodes: the first view is one "×30" box, a few dozen SVG elements in
    a few hundred pixels; opened fully, every node is drawn. Sizes print with `pytest -s`."""
    from graphllm.graph_render import render_html
    from graphllm.graph_view import build_view

    rows = _llama_like_rows(30)
    view = build_view(rows)
    pages = {}
    for expand in ("auto", "all"):
        path = tmp_path / f"{expand}.html"
        path.write_text(render_html(view, title="synthetic", expand=expand))
        pages[expand] = _page(path)
        parser, _, page = pages[expand]
        print(f"30 layers, {len(rows)} nodes, expand={expand}: {len(page.encode())} bytes, {parser.drawn} SVG "
              f"elements, {len(parser.nodes)} nodes drawn, {parser.edges} edges, viewBox {_view_box(page)}")
    parser, data, page = pages["auto"]
    assert len(rows) > 3000 and len(data["nodes"]) == len(rows)
    assert re.findall(r'class="badge"[^>]*>×(\d+)<', page) == ["30"]
    assert parser.drawn <= 300 and len(parser.nodes) <= 20
    assert max(_view_box(page)) <= 2000
    assert len(page.encode()) < 150 * len(rows)  # the data, not the drawing, grows with the graph
    full, _, full_page = pages["all"]
    assert len(full.nodes) == len(rows) and full.edges == sum(len(r["inputs"].split(",")) for r in rows if r["inputs"])
    _self_contained(full_page, full)


def test_groups_runs_and_aggregated_edges() -> None:
    from graphllm.graph_layout import initial_state, layout
    from graphllm.graph_view import build_view

    rows = _llama_like_rows(6, odd_layer=3)
    view = build_view(rows)
    group = {r["name"]: view.groups[view.group_of[i]].path for i, r in enumerate(rows)}
    assert group["w2_self_attn_q_proj"] == group["l2_self_attn_q_proj_0"] == "model.layers.2.self_attn.q_proj"
    assert group["l2_add"] == "model.layers.2" and group["input_ids"] == ""
    # layer 3 differs in one op: it splits the run, which must not fold layers that are not the same
    assert [[view.groups[m].path for m in run.members] for run in view.runs] == [
        [f"model.layers.{k}" for k in (0, 1, 2)], [f"model.layers.{k}" for k in (4, 5)]]
    state = initial_state(view, "layers")
    assert sorted(view.groups[g].path for g in state.expanded) == ["", "model", "model.layers"]
    scene = layout(view, state)
    run_of = {m: r for r, run in enumerate(view.runs) for m in run.members}

    def drawn_as(i: int) -> tuple[str, int]:  # the outermost closed box holding node i, else the node
        g = next((g for g in view.chain(view.group_of[i])[1:] if g not in state.expanded), None)
        return ("node", i) if g is None else ("run", run_of[g]) if g in run_of else ("group", g)

    crossing = Counter((drawn_as(u), drawn_as(v)) for v, ins in enumerate(view.inputs) for u in ins)
    crossing = {ab: k for ab, k in crossing.items() if ab[0] != ab[1]}
    n, gr = len(rows), len(rows) + len(view.groups)
    item = {"node": 0, "group": n, "run": gr}
    assert scene.edges == {(item[a[0]] + a[1], item[b[0]] + b[1]): k for (a, b), k in crossing.items()}
    assert len(scene.leaves) == len({drawn_as(i) for i in range(n)}) < 15


def test_tiny_backward_groups_by_inferred_layer(artifact: Path) -> None:
    """aot_autograd's backward records no module: its ops join the layer whose saved tensors they read."""
    from graphllm.graph_view import build_view

    view = build_view(_rows(artifact, "backward"))
    calls = [i for i, r in enumerate(view.rows) if r["op"] == "call_function"]
    assert calls and all(view.inferred[i] for i in calls)
    layer = Counter(view.groups[view.group_of[i]].path.split(".")[:3][-1] for i in calls)
    assert all(layer[str(k)] > 150 for k in range(4)), layer  # ~200 ops in each of the 4 layers
    assert [len(run.members) for run in view.runs] == [3]


def test_page_script_draws_what_python_draws(artifact: Path) -> None:
    """graph_page.js is the page's layout and markup: under node, for the first view and after opening
    groups and unfolding runs, it must draw exactly what graph_layout/graph_render draw."""
    import random
    import shutil
    import subprocess

    from graphllm.graph_layout import State, layout
    from graphllm.graph_render import page_data, svg_markup
    from graphllm.graph_view import build_view

    node = shutil.which("node")
    if node is None:
        pytest.skip("needs node (Node.js) to run the page's script")
    script = Path(__file__).resolve().parents[1] / "graphllm" / "graph_page.js"
    driver = ("const p = require(process.argv[1]); const i = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
              "const v = p.prepare(i.data);"
              "console.log(JSON.stringify(i.states.map((s) => p.markup(v, p.layout(v, p.stateOf(s))))));")
    rng = random.Random(0)
    for rows in (_rows(artifact, "backward"), _llama_like_rows(4, odd_layer=2)):
        view = build_view(rows)
        data = page_data(view, title="t", created="fuse_attention", expand="auto")
        every = list(range(len(view.groups)))
        states = [data["initial"], data["layers"], {"expanded": every, "unfolded": list(range(len(view.runs)))}]
        states += [{"expanded": sorted({0, *rng.sample(every, len(every) // 2)}),
                    "unfolded": rng.sample(range(len(view.runs)), len(view.runs) // 2)} for _ in range(4)]
        js = subprocess.run([node, "-e", driver, str(script)], input=json.dumps({"data": data, "states": states}),
                            capture_output=True, text=True, check=True, timeout=120)
        drawn = json.loads(js.stdout)
        for s, markup in zip(states, drawn):
            scene = layout(view, State(frozenset(s["expanded"]), frozenset(s["unfolded"])))
            assert markup == svg_markup(data, scene), f"graph_page.js draws another picture for state {s}"


def test_render_dot_clusters_by_module(artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "g.dot"
    assert main(["inspect", str(artifact), "--render", "lower_ops", "--out", str(out)]) == 0
    dot = out.read_text()
    rows = _rows(artifact, "08_lower_ops")
    assert dot.count("subgraph cluster_") > 40 and dot.count("{") == dot.count("}")
    layer1 = dot[dot.index('label="model.layers.1 ('):]
    assert '"linear_7"' in layer1.split('label="model.layers.2 (')[0]  # layer 1's q_proj sits in its cluster
    assert all(dot.count(f'  "{r["name"]}" [label=') == 1 for r in rows)
    assert dot.count(" -> ") == sum(len(r["inputs"].split(",")) for r in rows if r["inputs"])


def test_render_model_explorer_json(artifact: Path, tmp_path: Path) -> None:
    """Model Explorer's graph collection (model_explorer.graph_builder): namespaces with '/' by layer."""
    out = tmp_path / "bw.json"
    assert main(["inspect", str(artifact), "--render", "backward", "--out", str(out)]) == 0
    collection = json.loads(out.read_text())
    assert set(collection) == {"label", "graphs"} and len(collection["graphs"]) == 1
    graph = collection["graphs"][0]
    assert graph["id"] == "backward" and len(graph["nodes"]) == len(_rows(artifact, "backward"))
    fields = {"id", "label", "namespace", "subgraphIds", "attrs", "incomingEdges", "outputsMetadata", "inputsMetadata"}
    ids = {n["id"] for n in graph["nodes"]}
    for n in graph["nodes"]:
        assert set(n) == fields and "." not in n["namespace"]
        assert all(set(a) == {"key", "value"} and isinstance(a["value"], str) for a in n["attrs"])
        assert all(set(e) == {"sourceNodeId", "sourceNodeOutputId", "targetNodeInputId"} and e["sourceNodeId"] in ids
                   for e in n["incomingEdges"])
    spaces = Counter(n["namespace"].split("/")[:3][-1] for n in graph["nodes"] if n["namespace"].startswith("model/layers/"))
    assert sorted(spaces) == ["0", "1", "2", "3"]
    mm = next(n for n in graph["nodes"] if n["label"] == "mm")
    assert mm["outputsMetadata"][0]["attrs"][0]["key"] == "tensor_shape"


def test_hostile_names_and_source_lines_stay_text(tmp_path: Path) -> None:
    """A user's model or pass decides node names, targets and source lines; the page shows them as text: no
    markup they carry becomes an element, and none ends or re-opens the inline data or script."""
    from graphllm.graph_render import render_html
    from graphllm.graph_view import build_view

    hostile = '</script><!--<script>alert(1)</script><img src=x onerror="alert(2)">'
    rows = _llama_like_rows(2)
    for r in rows:
        if r["op"] == "call_function":
            r["source"] = f"models/evil.py:1 {hostile}"
    rows[-2]["target"] = f"aten.linear.default{hostile}"
    for expand in ("auto", "all"):
        page = render_html(build_view(rows), title=f"t{hostile}", expand=expand)
        tags = Counter(t.lower() for t in re.findall(r"<\s*([a-zA-Z]+)", page))
        assert tags["script"] == 2 and tags["img"] == 0, tags  # the data and the code, nothing the names carry
        assert page.lower().count("</script") == 2 and "<!--" not in page
        data = json.loads(re.search(r'<script type="application/json" id="graph-data">(.*?)</script>', page,
                                    re.S).group(1))
        assert f"models/evil.py:1 {hostile}" in data["strings"]  # kept whole, as text
