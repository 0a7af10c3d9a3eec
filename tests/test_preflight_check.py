"""graphllm.preflight.check on hand-made graphs and a hand-made converter index: each status, the
capture rules, provenance, and the blocking line (no wheel needed: the index is given)."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from graphllm.passes.manager import PASS_META_KEY
from graphllm.preflight.check import (BUILTIN, CONDITIONAL, CONVERTER, MISSING, REFUSED, NOT_CAPTURABLE, STUB,
                                      GraphCheck, blocking_line, check_graph, coverage_counts, first_blocking,
                                      model_origins)
from graphllm.preflight.converters import Converter

aten = torch.ops.aten
INDEX = {
    "aten.add.Tensor": Converter("aten.add.Tensor", "implemented", "ge_converter/aten/add.py:15",
                                 dtypes=("float16", "float32")),
    "aten.mul.Tensor": Converter("aten.mul.Tensor", "implemented", "ge_converter/aten/mul.py:9"),
    "aten.sinc.default": Converter("aten.sinc.default", "stub", "ge_converter/aten/sinc.py:7"),
    "aten.max.dim": Converter("aten.max.dim", "partial", "ge_converter/aten/max.py:30",
                              unsupported=("keepdim: not supported",)),
    "aten.bernoulli.p": Converter("aten.bernoulli.p", "implemented", "ge_converter/aten/bernoulli.py:4"),
}


def _graph(fn, *args) -> fx.GraphModule:
    return make_fx(fn)(*args)


def _by_op(check: GraphCheck) -> dict[str, tuple[str, int]]:
    return {o.op: (o.status, o.count) for o in check.ops}


def test_each_status():
    def fn(x):
        y = aten.add.Tensor(x, x)
        y = aten.add.Tensor(y, x)
        z = aten.mul.Tensor(aten.sinc.default(y), 0.0)
        m = aten.max.dim(z, -1, True)[0]
        return aten.cos.default(m)

    check = check_graph(_graph(fn, torch.randn(2, 3)), INDEX, rank=1, graph="forward", capture=False)
    got = _by_op(check)
    assert got["aten.add.Tensor"] == (CONVERTER, 2)
    assert got["aten.sinc.default"] == (STUB, 1)
    assert got["aten.max.dim"][0] == CONDITIONAL
    assert got["aten.cos.default"] == (MISSING, 1)
    assert got["_operator.getitem"][0] == BUILTIN
    assert [o.op for o in check.blocking] == ["aten.cos.default", "aten.sinc.default"]  # blocking first
    assert coverage_counts([check])[STUB] == 1


def test_a_dtype_outside_the_declared_test_cases_is_noted_not_flagged():
    """declare_supported lists torchair's own test cases (unsqueeze declares only float32), not a restriction."""
    check = check_graph(_graph(lambda x: aten.add.Tensor(x, x), torch.randn(2, dtype=torch.bfloat16)), INDEX,
                        rank=0, graph="forward", capture=False)
    (op,) = [o for o in check.ops if o.op == "aten.add.Tensor"]
    assert op.status == CONVERTER and "bfloat16" in op.detail and not op.blocking


def test_capture_rules_flag_rng_and_host_sync_only_when_captured():
    def fn(x):
        keep = aten.bernoulli.p(x, 0.5)
        return aten.mul.Tensor(x, keep), aten.nonzero.default(x)

    g = _graph(fn, torch.rand(4))
    assert _by_op(check_graph(g, INDEX, rank=0, graph="decode", capture=True))["aten.bernoulli.p"][0] == NOT_CAPTURABLE
    assert _by_op(check_graph(g, INDEX, rank=0, graph="decode", capture=True))["aten.nonzero.default"][0] == NOT_CAPTURABLE
    assert _by_op(check_graph(g, INDEX, rank=0, graph="forward", capture=False))["aten.bernoulli.p"][0] == CONVERTER


def test_a_graphllm_op_left_by_the_lowering_has_no_converter():
    g = _graph(lambda x, w: torch.ops.graphllm.rms_norm(x, w, 1e-6), torch.randn(2, 8), torch.ones(8))
    (op,) = check_graph(g, INDEX, rank=0, graph="forward", capture=False).ops
    assert op.op == "graphllm.rms_norm.default" and op.status == MISSING and "graphllm op" in op.detail


def test_provenance_names_the_pass_and_the_blocking_line_says_it():
    g = _graph(lambda x: aten.add.Tensor(x, x), torch.randn(2))
    add = next(n for n in g.graph.nodes if n.op == "call_function")
    with g.graph.inserting_after(add):
        bad = g.graph.call_function(aten.sinc.default, (add,))
    add.replace_all_uses_with(bad, delete_user_cb=lambda n: n is not bad)
    bad.meta[PASS_META_KEY] = "my_pass"
    bad.meta["val"] = add.meta["val"]
    g.recompile()
    origins = model_origins(g)
    assert origins["aten.sinc.default"][0] == "my_pass"
    check = check_graph(g, INDEX, rank=0, graph="backward", capture=False, origins=origins)
    found = first_blocking([check])
    assert found is not None and found[1].op == "aten.sinc.default" and found[1].made_by == "my_pass"
    line = blocking_line(*found, "torch_npu 2.13.0")
    assert "aten.sinc.default" in line and "my_pass" in line and "stub" in line and "\n" not in line
    assert GraphCheck.from_json(check.to_json()).ops == check.ops


def test_builtin_targets():
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(operator.getitem, (x, 0)))
    check = check_graph(fx.GraphModule({}, g), INDEX, rank=0, graph="forward", capture=True)
    assert [o.status for o in check.ops] == [BUILTIN]


def test_a_rule_evaluates_a_partial_converters_conditions(monkeypatch):
    """A partial converter with a current rule is `unsupported inputs` (blocking) or works, per node; a rule
    written against other conditions (a changed converter) no longer applies: `conditional` again."""
    from graphllm.preflight import conditions

    conv = INDEX["aten.max.dim"]
    rule = conditions.Rule(lambda a: "keepdim=True" if a["keepdim"] else "", conditions.conditions_fingerprint(conv))
    monkeypatch.setitem(conditions.RULES, "aten.max.dim", rule)
    keep = _by_op(check_graph(_graph(lambda x: aten.max.dim(x, -1, True)[0], torch.randn(2, 3)), INDEX, rank=0,
                              graph="forward", capture=False))
    drop = _by_op(check_graph(_graph(lambda x: aten.max.dim(x, -1)[0], torch.randn(2, 3)), INDEX, rank=0,
                              graph="forward", capture=False))
    assert keep["aten.max.dim"][0] == REFUSED and drop["aten.max.dim"][0] == CONVERTER
    monkeypatch.setitem(conditions.RULES, "aten.max.dim", conditions.Rule(rule.check, "0" * 12))
    stale = _by_op(check_graph(_graph(lambda x: aten.max.dim(x, -1, True)[0], torch.randn(2, 3)), INDEX, rank=0,
                               graph="forward", capture=False))
    assert stale["aten.max.dim"][0] == CONDITIONAL


def test_guarded_refuses_a_blocking_graph_before_compiling_it():
    """The npu backend's torchair compiler is wrapped so: a blocking op never reaches GE."""
    import pytest

    from graphllm.errors import GraphllmError
    from graphllm.preflight.check import guarded

    compiled = []
    fn = guarded(lambda gm, inputs: compiled.append(gm) or gm, index=INDEX, wheel="torch_npu 2.13.0", rank=3,
                 capture=False, graph_name=lambda: "backward")
    good = _graph(lambda x: aten.add.Tensor(x, x), torch.randn(2))
    assert fn(good, []) is good and compiled == [good]
    with pytest.raises(GraphllmError, match=r"rank 3 backward graph: aten.sinc.default \(stub"):
        fn(_graph(lambda x: aten.sinc.default(x), torch.randn(2)), [])
    assert len(compiled) == 1
