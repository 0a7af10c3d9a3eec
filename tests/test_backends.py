"""Every registered backend honours the plan's recompute policy (the typed backend seam).

The npu backend used to partition with `default_partition` and never read the policy, so
`compile --backend npu --recompute full` trained without recomputation. Here each registered backend
(npu through a stand-in torch_npu whose torchair compiler runs the graphs eagerly, with the CPU
emulations of the kernels) compiles tiny-llama with `full` and with `none`: with `full` the backward
graph must contain recompute-stamped ops and the forward must hand over fewer bytes.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
import torch

import graphllm
import npu_emulation  # noqa: F401  (registers torch.ops.npu.* emulations for the npu lowering table)
from graphllm.backends import Backend, backend_names, register_backend
from graphllm.planning.memory import saved_activation_bytes
from graphllm.planning.recompute_config import RecomputeConfig
from graphllm.recompute import recomputed_nodes

SEQ = 16


def _fake_torch_npu(monkeypatch) -> None:
    """`import torch_npu` and `torch_npu.dynamo.torchair` for the npu backend, without Ascend: the
    torchair compiler returns the graph run op by op (what a real torchair would compile for GE)."""
    from functorch.compile import make_boxed_func

    def config():
        ns = types.SimpleNamespace
        return ns(mode=None, debug=ns(graph_dump=ns(type=None, path=None)),
                  experimental_config=ns(frozen_parameter=False, tiling_schedule_optimize=False,
                                         topology_sorting_strategy="DFS"))

    seen: list[object] = []

    def get_compiler(cfg):
        seen.append(cfg)
        return lambda gm, example_inputs: make_boxed_func(gm.forward)

    torch_npu = types.ModuleType("torch_npu")
    torch_npu.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
    dynamo = types.ModuleType("torch_npu.dynamo")
    dynamo.torchair = types.SimpleNamespace(CompilerConfig=config, get_compiler=get_compiler)
    torch_npu.dynamo = dynamo
    monkeypatch.setitem(sys.modules, "torch_npu", torch_npu)
    monkeypatch.setitem(sys.modules, "torch_npu.dynamo", dynamo)


def _backward(backend: str, policy: str):
    model = graphllm.load_model("tiny-llama", seed=0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, SEQ), generator=g)
    labels = torch.randint(0, model.config.vocab_size, (1, SEQ), generator=g)
    compiled = graphllm.compile(model, ids, labels, backend=backend, recompute=RecomputeConfig(policy=policy))
    loss = compiled(ids, labels)
    loss.backward()
    return loss.detach(), compiled.result.train_stage.graphs["backward"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", backend_names())
def test_every_backend_recomputes_under_full(backend, monkeypatch) -> None:
    if backend == "npu":
        _fake_torch_npu(monkeypatch)
    loss_none, none = _backward(backend, "none")
    loss_full, full = _backward(backend, "full")
    repro = f"reproduce: python -m pytest tests/test_backends.py -k {backend}"
    assert recomputed_nodes(none) == 0, repro
    assert recomputed_nodes(full) > 0, f"{backend}: no recompute-stamped op in the backward graph; {repro}"
    assert saved_activation_bytes(full) < saved_activation_bytes(none), repro
    assert torch.equal(loss_full, loss_none), repro  # recomputation changes what is kept, not the arithmetic


def test_backend_must_choose_one_seam() -> None:
    from graphllm.errors import GraphllmError

    with pytest.raises(GraphllmError, match="exactly one of graph_compiler"):
        register_backend(Backend(name="half-wired", lowering="eager", description="neither"))
