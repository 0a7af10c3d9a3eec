"""Activation offload (graphllm/offload_activations.py) on the eager backend, tiny-llama, seq 32.

The offload and prefetch ops copy values unchanged, so losses and gradients must be bitwise equal to no
offload (STYLE.md §6). On CPU host and device are one memory, so what is checked here is correctness and
placement: which values move, that the forward hands the host copy to the backward, and that the backward's
prefetch precedes the first use by the planned number of layers.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import graphllm
from graphllm.compile import compile_pipeline, plan_for
from graphllm.errors import GraphllmError
from graphllm.offload_activations import Saved, choose, offload_saved, offloaded_bytes, saved_values
from graphllm.pass_pipeline import build_pipeline
from graphllm.plan import CompilePlan
from graphllm.planning.memory import saved_activation_bytes
from graphllm.planning.lora_config import LoraConfig
from graphllm.planning.offload_config import ActivationOffloadConfig
from graphllm.planning.recompute_config import RecomputeConfig

SEQ = 32
OFFLOAD = torch.ops.graphllm.offload_to_host.default
PREFETCH = torch.ops.graphllm.prefetch_to_device.default
PLAN = {"lora": LoraConfig(rank=4), "fused_loss": "on", "amp": "bf16"}
"""Every run's plan besides its policies: offload composes with LoRA, the fused loss and bf16 autocast (the pairs
docs/composability.md lists as covered here)."""
CASES = {
    "none-full": (ActivationOffloadConfig(), RecomputeConfig(policy="full")),
    # recomputation is bitwise equal to none whatever the policy (tests/test_recompute.py): one reference for all
    "attention-first2-prefetch0-selective": (ActivationOffloadConfig(activations="attention", layers=2,
                                                                     prefetch_layers=0),
                                             RecomputeConfig(policy="selective", ops=("activation",))),
    "all-full": (ActivationOffloadConfig(activations="all"), RecomputeConfig(policy="full")),
}
REFERENCE = "none-full"


def _step(offload: ActivationOffloadConfig, recompute: RecomputeConfig):
    torch.manual_seed(0)
    model = graphllm.load_model("tiny-llama", seed=0)
    ids, labels = torch.randint(0, model.config.vocab_size, (2, 2, SEQ), generator=torch.Generator().manual_seed(1))
    plan = dataclasses.replace(plan_for(model, (ids, labels), backend="eager", recompute=recompute),
                               activation_offload=offload, **PLAN)
    compiled = compile_pipeline(model, (ids, labels), build_pipeline(plan))
    loss = compiled(ids, labels)
    loss.backward()
    graphs = compiled.result.train_stage.graphs
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, \
        graphs["forward"], graphs["backward"]


@pytest.fixture(scope="module")
def runs():
    return {name: _step(*case) for name, case in CASES.items()}


def _calls(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


@pytest.mark.parametrize("name", [n for n in CASES if n != REFERENCE])
def test_offload_is_bitwise_equal(runs, name: str) -> None:
    repro = f"reproduce: python -m pytest tests/test_activation_offload.py -k 'bitwise and {name}'"
    loss0, grads0, _, _ = runs[REFERENCE]
    loss, grads, _, _ = runs[name]
    assert torch.equal(loss, loss0), f"{name}: loss {loss.item()!r} != {loss0.item()!r}; {repro}"
    for n, g in grads0.items():
        assert torch.equal(grads[n], g), f"{name}: grad of {n} differs by {(grads[n] - g).abs().max():.3e}; {repro}"


@pytest.mark.parametrize("name", [n for n in CASES if n != REFERENCE])
def test_forward_hands_host_copies_to_backward(runs, name: str) -> None:
    _, _, fwd, bwd = runs[name]
    offloads, prefetches = _calls(fwd, OFFLOAD), _calls(bwd, PREFETCH)
    assert offloads and len(offloads) == len(prefetches), (name, len(offloads), len(prefetches))
    outputs = fwd.graph.find_nodes(op="output")[0].args[0]
    for off in offloads:
        assert off in outputs, f"{name}: {off.name} is not handed to the backward"
        assert off.args[0] not in outputs, f"{name}: {off.args[0].name} is still handed over on the device too"
        assert off.prev is off.args[0], f"{name}: {off.name} is not issued right after its value is produced"
    moved = {off.args[0].name for off in offloads}
    assert {p.args[0].name for p in prefetches} == moved
    for p in prefetches:  # the saved input is read only through its prefetch
        assert list(p.args[0].users) == [p], (name, p.args[0].name, list(p.args[0].users))
    # the backward's i-th saved input is the forward's i-th saved output (what aot_autograd hands over)
    inputs = [p for p in bwd.graph.find_nodes(op="placeholder") if not p.name.startswith("tangents")]
    handed = dict(zip(inputs, outputs[len(outputs) - len(inputs):]))
    host = {p.name for p, o in handed.items() if o.target is OFFLOAD}
    assert all(o.name == p.name for p, o in handed.items() if o.target is not OFFLOAD), name
    assert all(o.args[0].name == p.name or o.meta["val"].shape == p.meta["val"].shape
               for p, o in handed.items() if o.target is OFFLOAD), name
    assert moved <= host, name
    for ph in bwd.graph.find_nodes(op="placeholder"):  # a host input is read through a prefetch, or not at all
        if ph.name in host:
            assert all(u.target is PREFETCH for u in ph.users), (name, ph.name)
    assert offloaded_bytes(bwd) == sum(s.nbytes for s in saved_values(fwd, bwd) if s.name in host)
    assert 0 < offloaded_bytes(bwd) <= saved_activation_bytes(bwd, fwd)


def _first_use(bwd, order):
    """saved value name → position of its first use in the backward (through its prefetch, if any)."""
    out = {}
    for ph in bwd.graph.find_nodes(op="placeholder"):
        users = [u for p in ph.users for u in (p.users if p.target is PREFETCH else [p])]
        if users:
            out[ph.name] = min(order[u] for u in users)
    return out


@pytest.mark.parametrize("name, distance", [("attention-first2-prefetch0-selective", 0),
                                            ("all-full", 1)])
def test_prefetch_precedes_first_use_by_the_planned_layers(runs, name: str, distance: int) -> None:
    _, _, fwd, bwd = runs[name]
    order = {n: i for i, n in enumerate(bwd.graph.nodes)}
    first = _first_use(bwd, order)
    saved = saved_values(fwd, bwd)
    layer_start = {}
    for s in saved:
        if s.layer is not None and s.name in first:
            layer_start[s.layer] = min(layer_start.get(s.layer, len(order)), first[s.name])
    layer = {s.name: s.layer for s in saved}
    for p in _calls(bwd, PREFETCH):
        own, at = first[p.args[0].name], order[p]
        assert at < own, f"{name}: {p.name} runs after its value's first use"
        target = layer[p.args[0].name] + distance
        if distance == 0:  # right before its first use (after other prefetches for the same op)
            between = list(bwd.graph.nodes)[at + 1:own]
            assert all(n.target is PREFETCH for n in between), f"{name}: {p.name} is not right before its use"
        elif target in layer_start:  # the backward of layer L + distance has not started yet
            assert at <= layer_start[target], f"{name}: {p.name} (layer {target - distance}) comes after layer " \
                                              f"{target}'s backward began"
        else:  # the last layers' values: prefetched as the backward starts
            assert all(n.op == "placeholder" or n.target is PREFETCH for n in list(bwd.graph.nodes)[:at]), name


def test_policy_chooses_kind_and_layers(runs) -> None:
    _, _, fwd, bwd = runs["attention-first2-prefetch0-selective"]
    moved = {p.args[0].name for p in _calls(bwd, PREFETCH)}
    saved = {s.name: s for s in saved_values(fwd, bwd)}
    assert {n for n, s in saved.items() if s.attention and s.layer is not None and s.layer < 2} == moved
    assert {saved[n].layer for n in moved} == {0, 1}, moved


def test_budget_offloads_first_layers_until_it_holds() -> None:
    mib = 2**20
    saved = [Saved("embedding", None, 4 * mib, False)] + [
        Saved(f"l{layer}_{i}", layer, mib, i == 0) for layer in range(4) for i in range(2)]  # 12 MiB
    names = lambda cfg: [s.name for s in choose(saved, cfg)]  # noqa: E731
    # keep ≤ 0.6 × 12 MiB = 7.2 MiB on the device: 5 MiB must move, the first layers' values first
    assert names(ActivationOffloadConfig(activations="all", budget=0.6)) == ["l0_0", "l0_1", "l1_0", "l1_1", "l2_0"]
    assert names(ActivationOffloadConfig(activations="attention", budget=0.6)) == ["l0_0", "l1_0", "l2_0", "l3_0"]
    assert names(ActivationOffloadConfig(activations="all", budget=1.0)) == []
    assert len(names(ActivationOffloadConfig(activations="all", budget=0.0))) == 8  # never the embedding
    assert names(ActivationOffloadConfig(activations="attention", layers=1)) == ["l0_0"]


def test_recomputed_values_are_not_offloaded(runs) -> None:
    _, _, fwd, bwd = runs["attention-first2-prefetch0-selective"]
    recomputed = {n for n in bwd.graph.nodes if n.meta.get("graphllm_pass") == "recompute"}
    assert recomputed and not any(p.args[0] in recomputed for p in _calls(bwd, PREFETCH))


def test_config_refusals() -> None:
    with pytest.raises(GraphllmError, match="--offload-layers needs --offload-activations"):
        ActivationOffloadConfig(layers=2)
    with pytest.raises(GraphllmError, match="give one"):
        ActivationOffloadConfig(activations="all", layers=1, budget=0.5)
    with pytest.raises(GraphllmError, match="--offload-budget must be a number ≤ 1"):
        ActivationOffloadConfig(activations="all", budget=1.5)
    with pytest.raises(GraphllmError, match="--offload-activations .* --backend npu"):
        CompilePlan(backend="npu", activation_offload=ActivationOffloadConfig(activations="attention"))


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x))) + x


class _Layers(torch.nn.Module):
    """Three `layers.<i>` blocks: what the offload policy sees of a decoder, in a graph small enough to trace."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(_Block() for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x.sum()


def _partitioned_pair():
    """The forward/backward pair aot_autograd's default partitioner makes of `_Layers` (before any rewrite)."""
    import copy

    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import default_partition

    pair = {}

    def partition(joint, inputs, **kw):
        fwd, bwd = default_partition(joint, inputs, **kw)
        pair.update(fwd=copy.deepcopy(fwd), bwd=copy.deepcopy(bwd))
        return fwd, bwd

    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward), partition_fn=partition)
    torch._dynamo.reset()
    torch.compile(_Layers(), backend=backend, fullgraph=True)(torch.randn(4, 8)).backward()
    return pair["fwd"], pair["bwd"]


def test_on_a_fake_cuda_device_every_backward_op_reads_device_values() -> None:
    """The pair's metadata moved to a fake cuda:0 device, then rewritten: the forward hands host values over, each
    prefetch brings its value back to cuda:0, and replaying the backward on fake tensors — which refuse an op
    mixing cuda and cpu tensors — proves that no op reads a host value directly."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fwd, bwd = _partitioned_pair()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    for node in [*fwd.graph.nodes, *bwd.graph.nodes]:
        v = node.meta.get("val")
        if isinstance(v, torch.Tensor):
            with mode:
                node.meta["val"] = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="cuda:0")
    moved = offload_saved(fwd, bwd, ActivationOffloadConfig(activations="all"))
    assert {s.layer for s in moved} == {0, 1, 2}, moved
    assert all(n.meta["val"].device.type == "cpu" for n in _calls(fwd, OFFLOAD))
    prefetches = _calls(bwd, PREFETCH)
    assert len(prefetches) == len(moved) and all(p.args[1] == "cuda:0" for p in prefetches)
    inputs = [n.meta["val"] for n in bwd.graph.find_nodes(op="placeholder")]
    assert {str(v.device) for v in inputs} >= {"cpu", "cuda:0"}, "the moved values arrive in host memory"
    with mode:
        grads = torch.fx.Interpreter(bwd).run(*inputs)
    assert all(g.device.type == "cuda" for g in grads if isinstance(g, torch.Tensor)), [g.device for g in grads]
