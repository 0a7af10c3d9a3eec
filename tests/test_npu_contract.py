"""graphllm's Ascend backend checked against torch_npu 2.13.0 by contract, with no NPU and no torch_npu.

graphllm declares what it uses: `graphllm.ops.lowering_npu.NPU_CONTRACT` (kernel -> the argument names
it passes), `graphllm.npu_backend.COMPILER_CONFIG_FIELDS` (dotted `CompilerConfig` options it sets) and
`TORCHAIR_FUNCTIONS` (torchair names it calls). These tests compare the declarations with the released
wheel's schema yaml and torchair sources (see `npu_wheel.py`), so a renamed kernel, argument or option
fails here instead of on an Ascend machine. The first run downloads the 43 MB wheel into the graphllm
cache; later runs read the cache.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

from graphllm.npu_backend import COMPILER_CONFIG_FIELDS, TORCHAIR_FUNCTIONS
from graphllm.ops.lowering_npu import NPU_CONTRACT
from npu_wheel import (TORCH_NPU_VERSION, compiler_config_fields, npu_schemas, schema_arg_names,
                       torchair_exports)

WHEEL = f"torch_npu {TORCH_NPU_VERSION}"
REPO = Path(__file__).resolve().parent.parent


def kernel_problems(contract: Mapping[str, Iterable[str]], schemas: Mapping[str, str]) -> list[str]:
    """One line per kernel missing from `schemas` or argument name missing from its schema."""
    problems = []
    for kernel, args in contract.items():
        if kernel not in schemas:
            problems.append(f"kernel {kernel} is not in {WHEEL}")
            continue
        known = schema_arg_names(schemas[kernel])
        problems += [f"{kernel}: no argument {arg!r} in {WHEEL} schema {schemas[kernel]}"
                     for arg in args if arg not in known]
    return problems


def name_problems(declared: Iterable[str], available: Iterable[str], what: str) -> list[str]:
    """One line per declared name that `available` lacks."""
    available = set(available)
    return [f"{what} {name!r} is not in {WHEEL}" for name in declared if name not in available]


def test_npu_kernels_and_arguments_exist():
    assert NPU_CONTRACT, "graphllm.ops.lowering_npu.NPU_CONTRACT is empty: nothing is checked"
    assert kernel_problems(NPU_CONTRACT, npu_schemas()) == []


def test_compiler_config_fields_exist():
    assert name_problems(COMPILER_CONFIG_FIELDS, compiler_config_fields(), "CompilerConfig field") == []


def test_torchair_functions_exist():
    assert name_problems(TORCHAIR_FUNCTIONS, torchair_exports(), "torchair name") == []


def test_hccl_comm_name_call_matches_torchairs():
    """The MC2 kernels' `hcom` comes from ProcessGroupHCCL.get_hccl_comm_name (a C++ method, so no schema
    to check): graphllm calls it as torchair's own graph-mode code does, with a rank and init_comm."""
    import inspect

    from graphllm.ops.lowering_npu_mc2 import hcom_name
    from npu_wheel import TORCHAIR_DIR, npu_wheel_root

    call = '_get_backend(torch.device("npu")).get_hccl_comm_name('
    ours = inspect.getsource(hcom_name)
    theirs = "".join(p.read_text() for p in (npu_wheel_root() / TORCHAIR_DIR).rglob("*.py"))
    assert call in ours and call + "rank, init_comm=True)" in theirs
    assert "init_comm=True" in ours


def test_npu_profiler_names_exist():
    """`graphllm profile` on an NPU uses torch_npu.profiler: its exports and _ExperimentalConfig's arguments."""
    import ast

    from graphllm.npu_backend import NPU_PROFILER_CONFIG_ARGS, NPU_PROFILER_NAMES
    from npu_wheel import npu_wheel_root

    pkg = npu_wheel_root() / "torch_npu" / "profiler"
    init = ast.parse((pkg / "__init__.py").read_text())
    exported = {a.asname or a.name for node in init.body if isinstance(node, ast.ImportFrom) for a in node.names}
    assert name_problems(NPU_PROFILER_NAMES, exported, "torch_npu.profiler name") == []
    config = ast.parse((pkg / "experimental_config.py").read_text())
    init_args = next(f.args for c in config.body if isinstance(c, ast.ClassDef) and c.name == "_ExperimentalConfig"
                     for f in c.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    names = {a.arg for a in init_args.args + init_args.kwonlyargs}
    assert name_problems(NPU_PROFILER_CONFIG_ARGS, names, "_ExperimentalConfig argument") == []


def test_checks_report_made_up_names():
    """The checks above can fail: each made-up kernel, argument and option is reported."""
    made_up = {"npu_does_not_exist": ("self",), "npu_rms_norm": ("self", "gamma", "eps")}
    problems = kernel_problems(made_up, npu_schemas())
    assert len(problems) == 2, problems
    assert "npu_does_not_exist" in problems[0] and "'eps'" in problems[1]
    assert name_problems(["mode", "debug.no_such_thing"], compiler_config_fields(),
                         "CompilerConfig field") == [f"CompilerConfig field 'debug.no_such_thing' is not in {WHEEL}"]
    assert name_problems(["get_compiler", "no_such_function"], torchair_exports(), "torchair name") == [
        f"torchair name 'no_such_function' is not in {WHEEL}"]


@pytest.mark.parametrize("schema, names", [
    ("npu_rms_norm(Tensor self, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor)",
     ["self", "gamma", "epsilon"]),
    ("f.List(Tensor[] x, *, int[2] k=[1, 1], str m=\"a,b\", Tensor(a!)? out=None) -> Tensor[]",
     ["x", "k", "m", "out"]),
])
def test_schema_arg_names(schema, names):
    assert schema_arg_names(schema) == names


def test_graphllm_never_imports_torch_npu():
    """Importing every importable graphllm module, and parsing the wheel, leaves torch_npu and torchair
    unimported. Run in a fresh interpreter: this process's sys.modules depends on which tests ran before.
    The subpackages live in their own folders (pyproject's package-dir), so each is walked by name."""
    with open(REPO / "pyproject.toml", "rb") as f:
        packages = tomllib.load(f)["tool"]["setuptools"]["packages"]
    script = textwrap.dedent("""
        import importlib, pkgutil, sys
        sys.path.insert(0, sys.argv[1])
        import npu_wheel
        npu_wheel.npu_schemas(); npu_wheel.compiler_config_fields(); npu_wheel.torchair_exports()
        imported = []
        for pkg_name in sys.argv[2:]:
            pkg = importlib.import_module(pkg_name)
            for mod in pkgutil.iter_modules(pkg.__path__, pkg_name + "."):
                if mod.name.endswith("__main__"):  # runs the CLI
                    continue
                try:
                    importlib.import_module(mod.name)
                except ImportError:  # an optional dependency that is not installed: not importable
                    continue
                imported.append(mod.name)
        assert {"graphllm.npu_backend", "graphllm.ops.lowering_npu"} <= set(imported), imported
        print(len(imported), sorted(m for m in sys.modules if m.split(".")[0] in ("torch_npu", "torchair")))
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent), *packages],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    count, npu_modules = proc.stdout.strip().split(" ", 1)
    assert int(count) > 10 and npu_modules == "[]", proc.stdout
    assert "torch_npu" not in sys.modules and "torchair" not in sys.modules


def _ge_converters() -> set[str]:
    """ATen overloads (`aten.mul.Tensor`) with a torchair GE converter in the wheel whose body is not just a raise
    (about a third of the generated converter files are `raise NotImplementedError` stubs)."""
    import ast

    from npu_wheel import TORCHAIR_DIR, npu_wheel_root

    working = set()
    for path in (npu_wheel_root() / TORCHAIR_DIR / "_ge_concrete_graph" / "ge_converter" / "aten").glob("*.py"):
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, ast.FunctionDef):
                continue
            body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
            for dec in fn.decorator_list:
                if (isinstance(dec, ast.Call) and getattr(dec.func, "id", "") == "register_fx_node_ge_converter"
                        and isinstance(dec.args[0], ast.Attribute) and not isinstance(body[0], ast.Raise)):
                    working.add(ast.unparse(dec.args[0]).removeprefix("torch.ops."))
    return working


def test_nf4_dequantize_runs_on_torchair_as_its_decomposition():
    """NF4 has no torch_npu kernel (ops/nf4.py NPU_WEIGHT_QUANT_MATMUL: the weight-quant matmul's antiquant is
    affine, NF4's levels are not), so the NPU runs nf4_dequantize's decomposition: every ATen op it traces to must
    have a working GE converter, and the kernel the reasoning cites must still have the arguments it names."""
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx

    from graphllm.ops.nf4 import NPU_NF4_CONTRACT, code_pairs, dynamic_map, nf4_dequantize_decomposed, quantize_nf4

    assert kernel_problems(NPU_NF4_CONTRACT, npu_schemas()) == []
    q = quantize_nf4(torch.randn(96, 64))
    traced = make_fx(lambda *t: nf4_dequantize_decomposed(*t, list(q.shape), q.dtype))(
        q.codes, q.qscales, q.scales2, q.offset, code_pairs(), dynamic_map())
    used = {str(n.target) for n in traced.graph.nodes if n.op == "call_function"}
    working = _ge_converters()
    assert "aten.index_select.default" in used and "aten.bitwise_right_shift.Tensor_Scalar" not in working
    assert sorted(used - working) == [], f"ATen ops of the NF4 decomposition without a GE converter in {WHEEL}"


@pytest.mark.parametrize("segments", [False, True], ids=["dense", "segments"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_attention_block_npu_ops_convert_on_torchair(causal, segments):
    """attention_block's npu lowering is npu_fusion_attention plus ATen ops (lse from the softmax statistics,
    the masks) and a backward in ATen ops (attention_block_grads): each of those must have a working GE
    converter, since torchair has no per-op fallback."""
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx

    import npu_emulation  # noqa: F401  (registers torch.ops.npu.* emulations, to trace the kernel call)
    from graphllm.ops.attention_block import attention_block_grads
    from graphllm.ops.lowering_npu import attention_block_npu

    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    seg = (torch.tensor([[0, 0, 1, 1, 2], [0, 1, 1, 1, 1]]), torch.tensor([[0, 1, 1, 1, 1, 2], [1] * 6]))
    seg_in = seg if segments else ()

    def forward(q, k, v, *s):
        return attention_block_npu(q, k, v, *(s or (None, None)), 0.3, causal)

    def backward(q, k, v, lse, grad_out, grad_lse, *s):
        return attention_block_grads(q, k, v, *(s or (None, None)), lse, grad_out, grad_lse, 0.3, causal)

    graphs = (make_fx(forward)(q, k, v, *seg_in),
              make_fx(backward)(q, k, v, torch.randn(2, 4, 5), torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5), *seg_in))
    used = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert "npu.npu_fusion_attention.default" in used
    aten = {op for op in used if op.startswith("aten.")}
    assert sorted(aten - _ge_converters()) == [], f"ATen ops of attention_block_npu without a GE converter in {WHEEL}"


class _TwoRanks:
    """A GroupResolver for lowering without process groups: this rank is index 1 of every group of 2."""

    def name(self, kind: str) -> str:
        return f"c10d-{kind}"

    def local_rank(self, kind: str) -> int:
        return 1

    def process_group(self, kind: str):
        raise AssertionError("torchair_group is replaced in this test")


@pytest.mark.parametrize("backend", ["npu", "npu-emulated", "eager"])
def test_cp_collectives_lower_to_ops_torchair_converts(backend, monkeypatch):
    """lower_collectives on a graph of cp_ring_shift and cp_all_to_all: for torchair's backends every op it emits has a
    working GE converter in the wheel (torchair's own all_to_all_single_npu, with element counts, displacements and
    the group's tag and ranks); for the others the `_c10d_functional` lowering stays."""
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx

    from graphllm.passes import lower_collectives as lc
    from graphllm.passes.manager import PassContext
    from graphllm.preflight.check import check_graph
    from graphllm.preflight.converters import converter_index
    from graphllm.preflight.emulation import all_to_all_schema, register_all_to_all
    from npu_wheel import npu_wheel_root

    register_all_to_all(all_to_all_schema(npu_wheel_root()))  # what torchair defines when imported
    monkeypatch.setattr(lc, "torchair_group", lambda groups, kind: (f"ptd:{kind}", [4, 6]))
    gl = torch.ops.graphllm

    def fn(x):  # [B, H, S, D]: one ring step, then heads scattered and the sequence gathered, and back
        y = gl.cp_ring_shift(x, 1, 2, "cp_ring")
        return gl.cp_all_to_all(gl.cp_all_to_all(y, 1, 2, 2, "cp_ulysses"), 2, 1, 2, "cp_ulysses")

    gm = lc.lower_collectives(make_fx(fn, tracing_mode="fake")(torch.randn(1, 4, 6, 8)),
                              PassContext(groups=_TwoRanks(), backend=backend, stage="train"))
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    a2a = [n.args for n in calls if str(n.target) == "npu_define.all_to_all_single_npu.default"]
    if not lc.lowers_to_torchair(backend):
        assert not a2a and sum(str(n.target) == "_c10d_functional.all_to_all_single.default" for n in calls) == 3
        return
    numel = 1 * 4 * 6 * 8
    assert a2a[0][1:] == ([numel, 0], [0, numel], [numel, 0], [0, numel], "ptd:cp_ring", [4, 6], 2)  # to/from rank 0
    assert a2a[1][1:] == ([numel // 2] * 2, [0, numel // 2], [numel // 2] * 2, [0, numel // 2], "ptd:cp_ulysses",
                          [4, 6], 2)
    check = check_graph(gm, converter_index(npu_wheel_root()), rank=0, graph="forward", capture=False)
    assert [(o.op, o.status, o.detail) for o in check.blocking] == [], f"ops torchair cannot convert in {WHEEL}"
    assert {o.op for o in check.ops} >= {"npu_define.all_to_all_single_npu.default", "aten.permute.default"}
