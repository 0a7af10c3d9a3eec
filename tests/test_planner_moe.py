"""`graphllm plan` for mixture-of-experts models: expert parallelism, expert tensor parallelism and context
parallelism are searched and priced from the captured graphs."""

from __future__ import annotations

import pytest

from graphllm.planner.devices import device_spec
from graphllm.planner.search import Space


def _config(family: str):
    import transformers

    from graphllm.models import ModelConfig
    from hf_parity import FAMILIES

    cls = {"deepseek-v3": transformers.DeepseekV3Config, "mixtral": transformers.MixtralConfig}[family]
    return ModelConfig.from_hf(cls(**FAMILIES[family][2]).to_dict(), source=family)


def test_deepseek_v3_is_searched_over_tp_and_ep() -> None:
    """DeepSeek-V3 (multi-latent attention, a dense first layer, then MoE layers): tp2 layouts are priced (MLA is
    tensor-parallel) and so is ep2 (the dense layer is measured without expert parallelism, which has nothing to
    share out there)."""
    from graphllm.planner.search import search

    cfg = _config("deepseek-v3")
    space = Space(tp=(1, 2), cp=(1,), mbs=(1,), vpp=(1,), recompute=("none",), zero1=(False,),
                  dispatchers=("alltoall",))
    result = search(cfg, devices=2, spec=device_spec("h100"), seq_len=32, global_batch=2, space=space, jobs=1)
    priced = {(c.layout.tp, c.layout.ep) for c in result.candidates if c.layout.pp == 1}
    assert {(1, 1), (1, 2), (2, 1)} <= priced, priced
    # at tp2 the experts are priced whole on each tp rank and split over tp (--etp 2): half the expert parameters
    tp2 = {c.layout.etp: c for c in result.candidates if c.layout.tp == 2 and c.layout.pp == 1}
    assert set(tp2) == {1, 2}, sorted(tp2)
    experts = {etp: c.prediction.ranks[0]["expert_params"] for etp, c in tp2.items()}
    assert experts[1] > 0 and experts[2] == pytest.approx(experts[1] / 2), experts
    from types import SimpleNamespace

    from graphllm.cli.plan_cmd import emit_command

    assert "--etp 2" in emit_command(tp2[2], "m", SimpleNamespace(seq_len=32, amp="bf16"), spec_name="h100")


def test_mixtral_is_priced_under_context_parallelism_with_whole_experts() -> None:
    """On 2 devices at cp2 (dp1, so --ep 1: expert parallelism is carved out of dp) every rank holds every expert:
    the plan is priced with the whole experts' parameters; with a capacity factor (refused with --cp) no cp layout
    is offered."""
    from graphllm.planner.search import enumerate_layouts, search

    cfg = _config("mixtral")
    space = Space(tp=(1,), cp=(2,), mbs=(1,), vpp=(1,), recompute=("none",), zero1=(False,))
    result = search(cfg, devices=2, spec=device_spec("h100"), seq_len=32, global_batch=2, space=space, jobs=1)
    cp2 = [c for c in result.candidates if c.layout.cp == 2]
    assert cp2 and all(c.layout.ep == 1 for c in cp2)
    whole = cfg.num_hidden_layers * cfg.num_experts * 3 * cfg.hidden_size * cfg.expert_size
    assert cp2[0].prediction.ranks[0]["expert_params"] == whole
    capped = Space(tp=(1,), cp=(2,), mbs=(1,), capacity_factor=1.0)
    layouts, pruned = enumerate_layouts(cfg, devices=2, seq_len=32, global_batch=2, spec=device_spec("h100"),
                                        space=capped)
    assert not [lay for lay, _ in layouts if lay.cp > 1] and pruned["--moe-capacity-factor with --cp"]


def test_expert_gradients_summed_over_tp_are_priced_at_etp1() -> None:
    """--ep with --tp and --etp 1 without sequence parallelism: each tp rank routed 1/tp of the tokens to the same
    expert shard, so the engine sums the expert gradients over tp before the expert-data-parallel average; the
    step's communication time holds that all-reduce (and no such sum under --etp 2 or sequence parallelism)."""
    from graphllm.planner.predict import MemoryOptions, _dp_comm_seconds, collective_seconds
    from graphllm.planning import Layout

    spec, opts, params, experts = device_spec("h100"), MemoryOptions(), 4e8, 3e8
    split = Layout(tp=2, dp=4, ep=2)
    others = [Layout(tp=2, dp=4, ep=2, etp=2), Layout(tp=2, dp=4, ep=2, sequence_parallel=True)]
    base = [_dp_comm_seconds(params, lay, spec, opts, experts=experts) for lay in others]
    assert base[0] == pytest.approx(base[1])
    extra = _dp_comm_seconds(params, split, spec, opts, experts=experts) - base[0]
    tp_sum = collective_seconds("tp all_reduce", 4 * experts, split, spec)  # fp32 gradients
    assert extra >= tp_sum > 0, (extra, tp_sum)
