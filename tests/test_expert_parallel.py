"""Expert parallelism (--ep) and expert capacity on real gloo ranks, against one process of the same seed.

A tiny Mixtral (4 experts, top-2, with transformers' load-balancing loss in the training loss) trains STEPS
AdamW steps. ep ranks are data-parallel ranks, each with its own rows, so the one-process reference runs the
same rows as micro-batches (gradient accumulation): per micro-batch routing, capacity and aux loss are the
per-rank ones. Every step's loss and the final parameters (expert shards put back together) must agree.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_util import run_ranks
from hf_parity import hf_model, rel_err, save_hf_checkpoint

STEPS = 3
SEQ, GLOBAL_BATCH = 16, 4
LOSS_RTOL = 1e-5
"""fp32: each token's output is the same sum of the same expert outputs, added in another order (reduce-scatter
over the ep group), and the expert gradients sum the group's tokens in another order."""
PARAM_RTOL = 2e-4
"""AdamW scales each element's reduction-order difference by its own running RMS (see test_parallel_training's
PARAM_RTOL, measured there); a wrong shard or a missing reduction shows as O(1)."""
ROUTER_LOSSES = {"z_loss_coeff": 1e-2, "seq_aux_loss_coeff": 1e-1}
"""--moe-z-loss-coeff, --moe-seq-aux-loss-coeff: per-sequence and per-micro-batch terms, so ep ranks (each with
whole sequences) add what the one-process micro-batches add; larger than in practice, so they move the routers."""
CAPACITY = 1.0
"""Each of 4 experts takes ceil(1.0 · T · 2 / 4) = T/2 pairs of a rank's T tokens: at random init some experts get
more, so pairs are dropped (the test checks the losses move)."""


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> str:
    return str(save_hf_checkpoint(hf_model("mixtral", "sdpa"), "mixtral", tmp_path_factory.mktemp("mixtral") / "ckpt"))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    from hf_parity import VOCAB

    g = torch.Generator().manual_seed(500 + step)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    return ids, torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)


def _masked_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """_batch with the first 5 labels of each row ignored (-100): context-parallel ranks then count different
    numbers of tokens, so weighting their cross-entropies by tokens differs from a plain mean."""
    ids, labels = _batch(step)
    labels[:, :5] = -100
    return ids, labels


def _plan(model: str, layout: dict, moe: dict | None = None, backend: str = "eager", mtp: int = 0):
    from graphllm.plan import CompilePlan
    from graphllm.planning import Layout
    from graphllm.planning.moe_config import MoeConfig
    from graphllm.planning.mtp_config import MtpConfig

    rows = layout.get("dp", 1) * layout.get("micro_batches", 1)
    return CompilePlan(model=model, batch_size=GLOBAL_BATCH // rows, seq_len=SEQ, backend=backend,
                       layout=Layout(**layout), moe=MoeConfig(**(moe or {})), mtp=MtpConfig(layers=mtp))


def train(model: str, layout: dict, moe: dict | None = None, *, save: str | None = None, load: str | None = None,
          stop_after: int | None = None, mtp: int = 0, masked: bool = False) -> dict:
    """Train on this rank; return its losses, its parameters with their ParamShard, and what its model graph holds."""
    from graphllm.job import build
    from graphllm.planning.sharding import shard_of
    from graphllm.resume import load_step, save_step
    from graphllm.train import TrainConfig, train_steps

    built = build(_plan(model, layout, moe, mtp=mtp))
    cfg = TrainConfig(steps=STEPS, lr=1e-3, warmup_steps=1, grad_clip=1.0, eps=1e-6)
    opt = built.engine.make_optimizer(cfg)
    start = load_step(load, built, opt) if load else 0
    losses, balance, mtp_losses = [], [], []
    for r in train_steps(built.engine, _masked_batch if masked else _batch, cfg, optimizer=opt, start_step=start):
        losses.append(r["loss"])
        balance.append((r.get("moe/max_load"), r.get("moe/dropped")))  # none for a dense model or --moe-stats off
        mtp_losses.append(r.get("mtp/loss"))
        if save and r["step"] == stop_after:
            save_step(save, built, opt, r["step"])
            break
    calls = [n for n in built.result.model_graph.graph.nodes if str(n.target).startswith("graphllm.")]
    dispatch = ("sp_gather", "sp_reduce_scatter", "cp_all_to_all", "tp_split", "tp_gather")
    collectives = sorted({f"{str(n.target).split('.')[1]}:{n.args[-1]}" for n in calls
                          if str(n.target).split(".")[1] in dispatch})
    from graphllm.planning.flops import forward_flops

    buffers = {n: b.detach().clone() for n, b in built.model.named_buffers() if n.endswith("correction_bias")}

    return {"losses": losses, "collectives": collectives, "balance": balance, "mtp": mtp_losses,
            "flops": forward_flops(built.result.model_graph), "buffers": buffers,
            "params": {n: (p.detach().clone(), shard_of(p)) for n, p in built.engine.named_params.items()}}


def _assemble(results: list[dict]) -> dict[str, torch.Tensor]:
    """Full parameters from every rank's pieces (expert shards differ across the ep group, and over tp under
    --etp): each piece goes where its ParamShard takes it from, found by slicing the full tensor's indices."""
    full: dict[str, torch.Tensor] = {}
    for r in results:
        for name, (t, shard) in r["params"].items():
            if shard is None:
                full[name] = t
                continue
            where = shard.slice_of(torch.arange(t.new_empty(shard.full_shape).numel()).view(shard.full_shape))
            full.setdefault(name, t.new_full(shard.full_shape, float("nan"))).view(-1)[where.flatten()] = t.flatten()
    assert not any(v.isnan().any() for v in full.values()), "a piece of a sharded parameter is on no rank"
    return full


def _check(case: str, results: list[dict], reference: dict) -> None:
    for r in results:
        for step, (got, want) in enumerate(zip(r["losses"], reference["losses"]), 1):
            assert abs(got - want) / abs(want) <= LOSS_RTOL, f"{case} step {step}: loss {got} vs {want}"
        assert r["balance"][0][0] is None or torch.allclose(torch.tensor(r["balance"]), torch.tensor(reference["balance"][:len(r["balance"])]),
                              rtol=LOSS_RTOL), f"{case}: load-balance metrics {r['balance']} vs {reference['balance']}"
    full, want = _assemble(results), {n: t for n, (t, _) in reference["params"].items()}
    assert set(full) == set(want)
    worst = max(rel_err(full[n], want[n]) for n in want)
    assert worst <= PARAM_RTOL, f"{case}: final parameters differ by {worst:.2e}"


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory) -> str:
    hf = hf_model("deepseek-v3", "sdpa")
    return str(save_hf_checkpoint(hf, "deepseek-v3", tmp_path_factory.mktemp("deepseek") / "ckpt"))


@pytest.fixture(scope="module")
def references(mixtral):
    return {micro: train(mixtral, {"micro_batches": micro}) for micro in (2, 4)}


CASES = {  # name: (layout, moe options, ranks, reference micro-batches)
    "ep2-allgather": ({"dp": 2, "ep": 2, "micro_batches": 2}, {}, 2, 4),  # gradients accumulated, then averaged
    "ep2xdp2-alltoall": ({"dp": 4, "ep": 2}, {"dispatcher": "alltoall"}, 4, 4),
    # attention tensor-parallel; the tp ranks of an ep rank share its expert shard, each routing 1/tp of the tokens
    "ep2xtp2": ({"tp": 2, "dp": 2, "ep": 2}, {}, 4, 2),
    # expert tensor parallelism: each expert's gate|up split by columns over tp, block-wise, its down by rows
    "ep2xetp2-alltoall": ({"tp": 2, "dp": 2, "ep": 2, "etp": 2}, {"dispatcher": "alltoall"}, 4, 2),
    "etp2": ({"tp": 2, "etp": 2, "micro_batches": 2}, {}, 2, 2),
    # sequence parallelism: each tp rank routes its shard of the sequence; the aux loss reads the gathered routing
    "tp2-sp": ({"tp": 2, "sequence_parallel": True, "micro_batches": 2}, {}, 2, 2),
    "ep2xetp2-sp": ({"tp": 2, "dp": 2, "ep": 2, "etp": 2, "sequence_parallel": True}, {}, 4, 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_expert_parallel_trains_like_one_process(case, mixtral, references):
    layout, moe, ranks, micro = CASES[case]
    results = run_ranks(train, ranks, mixtral, layout, moe)
    _check(case, results, references[micro])
    tp = layout.get("tp", 1)
    if tp == 1:  # the rank's work is its own tokens' pairs, not the gathered or padded rows its buffers hold
        assert results[0]["flops"] == references[micro]["flops"], (results[0]["flops"], references[micro]["flops"])
    want = {"allgather": ["sp_gather:ep", "sp_reduce_scatter:ep"], "alltoall": ["cp_all_to_all:ep"]}
    ep, etp, sp = layout.get("ep", 1), layout.get("etp", 1), layout.get("sequence_parallel", False)
    want = (want[moe.get("dispatcher", "allgather")] if ep > 1 else []) + (
        ["tp_gather:tp", "tp_split:tp"] if tp > 1 and etp == 1 and not sp else [])
    if sp:  # its own gathers and reduce-scatters, and the router statistics' gather (tp_gather)
        want = sorted({*want, "sp_gather:tp", "sp_reduce_scatter:tp", "tp_gather:tp"})
    assert results[0]["collectives"] == sorted(want), results[0]["collectives"]
    for rank, r in enumerate(results):  # each rank holds its own part of every expert weight
        experts = {n: s for n, (_, s) in r["params"].items() if ".experts." in n}
        want = [("ep", 2, rank // tp % 2)] * (ep > 1) + [("tp", etp, rank % tp)] * (etp > 1)
        assert experts and all([(lv.group, lv.count, lv.index) for lv in (s.levels if s else ())] == want
                               for s in experts.values())
        assert all(s is None or s.levels[-1].blocks == (2 if etp > 1 and "gate_up" in n else 1)
                   for n, s in experts.items())


def test_capacity_drops_the_same_pairs_under_both_dispatchers(mixtral, references):
    """--moe-capacity-factor on one process (2 micro-batches) = ep2 all-gather = ep2 all-to-all; and it drops."""
    moe = {"capacity_factor": CAPACITY}
    alone = train(mixtral, {"micro_batches": 2}, moe)
    assert alone["losses"][0] != references[2]["losses"][0], "the capacity dropped nothing: raise the test's load"
    assert all(dropped > 0 for _, dropped in alone["balance"]) and all(d == 0 for _, d in references[2]["balance"])
    assert all(1 < load <= 4 for load, _ in alone["balance"])  # 4 experts: max load is at most E times the mean
    for dispatcher in ("allgather", "alltoall"):
        _check(f"capacity {dispatcher}", run_ranks(train, 2, mixtral, {"dp": 2, "ep": 2}, dict(moe, dispatcher=dispatcher)),
               alone)


def test_checkpoint_saved_at_ep2_etp2_resumes_on_one_process_and_at_tp2(mixtral, references, tmp_path: Path):
    """A checkpoint holds whole expert tensors (gate|up with its block axis: [E, 2, I, H]): saved at tp2 × ep2 with
    the experts split over tp too (4 ranks) after step 2, resumed on one process, at tp2 with whole experts and at
    tp2 with split ones, the last step's loss is the uninterrupted run's."""
    from torch.distributed.checkpoint import FileSystemReader

    layout = {"tp": 2, "dp": 2, "ep": 2, "etp": 2}
    run_ranks(train, 4, mixtral, layout, save=str(tmp_path / "ckpt"), stop_after=2)
    ckpt, want = str(tmp_path / "ckpt" / "step_2"), references[2]["losses"][2]
    md = FileSystemReader(ckpt).read_metadata().state_dict_metadata
    assert tuple(md["model/model.layers.0.mlp.experts.gate_up_proj"].size)[:2] == (4, 2)
    for name, resumed in (("one process", train(mixtral, {"micro_batches": 2}, load=ckpt)),
                          ("tp2", run_ranks(train, 2, mixtral, {"tp": 2, "micro_batches": 2}, load=ckpt)[0]),
                          ("tp2 etp2", run_ranks(train, 2, mixtral, {"tp": 2, "etp": 2, "micro_batches": 2},
                                                 load=ckpt)[0])):
        assert len(resumed["losses"]) == 1
        assert abs(resumed["losses"][0] - want) / want <= LOSS_RTOL, f"resumed at {name}: {resumed['losses']} vs {want}"


def test_deepseek_v3_mla_at_tp2_sp_ep2_etp2_trains_like_one_process(deepseek):
    """DeepSeek-V3's multi-latent attention is tensor-parallel (passes/tp_plan.py): q_b_proj and kv_b_proj split by
    head, o_proj by its input, the down-projections and their norms whole, the shared rope key read through a
    tp_copy (an all-gather under sequence parallelism); with the experts shared out over ep2 on 4 ranks (tp2 × dp2)
    and each split over tp (--etp 2; the shared expert is a dense tensor-parallel MLP), the residual stream
    sequence-parallel, routing biases moving. Losses, the load-balance metrics and the final parameters equal one
    process's."""
    moe = {"dispatcher": "alltoall", "bias_update_rate": BIAS_RATE}
    reference = train(deepseek, {"micro_batches": 2}, moe)
    results = run_ranks(train, 4, deepseek, {"tp": 2, "dp": 2, "ep": 2, "etp": 2, "sequence_parallel": True}, moe)
    _check("deepseek-v3 tp2×ep2", results, reference)
    for r in results:
        shards = {n.rsplit(".", 2)[-2]: s for n, (_, s) in r["params"].items() if s is not None and s.group == "tp"}
        assert {"q_b_proj", "kv_b_proj", "o_proj"} <= set(shards), sorted(shards)
        assert not any(k in shards for k in ("q_a_proj", "kv_a_proj_with_mqa")), sorted(shards)


def test_deepseek_v3_at_ep2_pp2_trains_like_one_process(deepseek):
    """DeepSeek-V3 (MLA, a dense first layer, group-limited sigmoid routing, a shared expert, no aux loss) on 4
    ranks: 2 pipeline stages × 2 data-parallel ranks whose routed experts are shared out by the all-to-all
    dispatcher; the shared expert and the routing bias stay whole. The load-balance metrics and the routing-bias
    counts come out of the last stage's loss graph: every rank moves the biases as one process does."""
    moe = {"dispatcher": "alltoall", "bias_update_rate": BIAS_RATE}
    reference = train(deepseek, {"micro_batches": 4}, moe)
    results = run_ranks(train, 4, deepseek, {"pp": 2, "dp": 2, "ep": 2, "micro_batches": 2}, moe)
    _check("deepseek-v3 pp2×ep2", results, reference)  # the load-balance metrics included
    assert all(r["balance"][0][0] is not None for r in results)
    for r in results:
        sharded = {n for n, (_, s) in r["params"].items() if s is not None}
        assert all(".mlp.experts." in n for n in sharded), sharded
        for name, t in reference["buffers"].items():
            assert torch.equal(r["buffers"][name], t), name
    assert any(t.abs().sum() > 0 for t in reference["buffers"].values())
    assert any(s is not None for _, s in results[2]["params"].values()), "stage 1 (the MoE layer) holds no shard"


def test_mixtral_with_router_losses_at_pp2_ep2_trains_like_one_process(mixtral):
    """Mixtral on 4 ranks, 2 pipeline stages × 2 data-parallel ranks sharing out the experts: the aux loss (a product
    of sums over every layer's routing, so the router statistics cross the stage boundary), the z-loss and the
    sequence-wise balance loss equal one process's."""
    reference = train(mixtral, {"micro_batches": 4}, ROUTER_LOSSES)
    results = run_ranks(train, 4, mixtral, {"pp": 2, "dp": 2, "ep": 2, "micro_batches": 2},
                        {"dispatcher": "alltoall", **ROUTER_LOSSES})
    _check("mixtral pp2×ep2", results, reference)


def test_mixtral_with_router_losses_under_sequence_parallelism_trains_like_one_process(mixtral):
    """tp2 × dp2 × ep2 with sequence parallelism (4 ranks): each tp rank routes its half of every sequence, and the
    losses read the routing gathered back in token order, so the aux loss, the z-loss and the sequence-wise balance
    loss (per sequence, over its whole length) and the load-balance metrics equal one process's."""
    reference = train(mixtral, {"micro_batches": 2}, ROUTER_LOSSES)
    results = run_ranks(train, 4, mixtral, {"tp": 2, "dp": 2, "ep": 2, "sequence_parallel": True}, ROUTER_LOSSES)
    _check("mixtral tp2×ep2 sp", results, reference)


BIAS_RATE = 0.05
"""Large enough that the tiny model's routing changes within 3 steps (DeepSeek-V3 used 0.001 over long runs)."""


@pytest.fixture(scope="module")
def bias_run(deepseek) -> dict:
    """One process, 2 micro-batches, the routing biases updated after each of the STEPS steps; with one MTP module
    (--mtp-layers 1: an MoE layer after the decoder, whose experts are shared out and whose bias moves like the
    decoder's)."""
    return train(deepseek, {"micro_batches": 2}, {"bias_update_rate": BIAS_RATE, **ROUTER_LOSSES}, mtp=1)


def test_expert_bias_update_moves_the_routing_like_one_process(deepseek, bias_run):
    """--moe-bias-update-rate: after each step every routing bias moves by ±rate towards balance, from the counts
    of the whole step's batch: ep2 (2 ranks) and one process with the same micro-batches make the same losses and
    end with the same biases and MTP losses (the router z-loss and sequence-wise balance loss on too); without the
    rate the losses differ (the biases changed the routing)."""
    moe = {"bias_update_rate": BIAS_RATE, **ROUTER_LOSSES}
    alone = bias_run
    plain = train(deepseek, {"micro_batches": 2}, ROUTER_LOSSES, mtp=1)
    assert alone["losses"][0] == plain["losses"][0] and alone["losses"][2] != plain["losses"][2]
    bias = {n: t for n, t in alone["buffers"].items() if n.endswith("e_score_correction_bias")}
    steps = torch.cat(list(bias.values())) / BIAS_RATE  # each step moves a bias by -rate, 0 or +rate
    assert bias and torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() >= 1
    results = run_ranks(train, 2, deepseek, {"dp": 2, "ep": 2}, moe, mtp=1)
    _check("bias update ep2", results, alone)
    assert "model.mtp.0.mlp.gate.e_score_correction_bias" in bias and all(m > 0 for m in alone["mtp"])
    for r in results:
        assert r["mtp"] == pytest.approx(alone["mtp"], rel=LOSS_RTOL)
        for name, t in bias.items():
            assert torch.equal(r["buffers"][name], t), name
        mtp_experts = [s for n, (_, s) in r["params"].items() if n.startswith("model.mtp.0.mlp.experts.")]
        assert mtp_experts and all(s is not None and s.group == "ep" for s in mtp_experts)


def test_routing_biases_are_checkpointed_resumed_and_exported(deepseek, bias_run, tmp_path: Path):
    """The biases are model state outside the optimizer: a checkpoint after step 1 holds them, the run resumed
    from it makes the uninterrupted run's later losses and ends with its biases, and graphllm-to-hf writes them."""
    from safetensors.torch import load_file

    from graphllm.convert import graphllm_to_hf

    moe = {"bias_update_rate": BIAS_RATE, **ROUTER_LOSSES}
    saved = train(deepseek, {"micro_batches": 2}, moe, save=str(tmp_path / "ckpt"), stop_after=1, mtp=1)
    resumed = train(deepseek, {"micro_batches": 2}, moe, load=str(tmp_path / "ckpt" / "step_1"), mtp=1)
    assert resumed["losses"] == pytest.approx(bias_run["losses"][1:], rel=LOSS_RTOL)
    for name, t in bias_run["buffers"].items():
        assert torch.equal(resumed["buffers"][name], t), name
    graphllm_to_hf(tmp_path / "ckpt" / "step_1", tmp_path / "hf")
    exported = {}
    for f in (tmp_path / "hf").glob("*.safetensors"):
        exported.update(load_file(f))
    assert saved["buffers"] and all(t.abs().min() == BIAS_RATE for t in saved["buffers"].values())  # each moved
    for name, t in saved["buffers"].items():  # the MTP module's under DeepSeek's name, model.layers.<L>.*
        assert torch.equal(exported[name.replace("model.mtp.0.", "model.layers.2.")], t), name



@pytest.mark.parametrize("layout, ranks", [
    ({"cp": 2, "micro_batches": 2}, 2),  # ring attention; the experts whole on both cp ranks
    ({"tp": 2, "sequence_parallel": True, "etp": 2, "cp": 2, "cp_algo": "ulysses", "micro_batches": 2}, 4),
    # experts shared out over ep2 (carved out of dp2), each shard's replicas the cp2 ranks: gradients over edp × cp
    ({"dp": 2, "ep": 2, "cp": 2}, 4),
])
def test_mixtral_with_router_losses_under_context_parallelism_trains_like_one_process(mixtral, layout, ranks):
    """Each cp rank routes its part of every sequence (zig-zag chunks under the ring; under --ep to the ep ranks
    of its cp index, and an expert shard's gradient is averaged over its dp/ep × cp replicas); the router losses read the
    routing all-gathered over cp (and over tp first under sequence parallelism) and are added to the cross-entropy
    unweighted, so the aux loss, the z-loss, the sequence-wise loss, the load-balance metrics and the final
    parameters equal one process's. Some labels are ignored, so the cp ranks' losses are weighted by their
    counted tokens."""
    reference = train(mixtral, {"micro_batches": 2}, ROUTER_LOSSES, masked=True)
    results = run_ranks(train, ranks, mixtral, layout, ROUTER_LOSSES, masked=True)
    _check(f"mixtral {layout}", results, reference)
    assert "sp_gather:cp" in results[0]["collectives"]  # the router statistics' gather


def test_deepseek_v3_under_ring_context_parallelism_trains_like_one_process(deepseek):
    """DeepSeek-V3 with one MTP module at dp2 × ep2 × cp2 (ring, 4 ranks, all-to-all dispatch): multi-latent
    attention's keys (nope + rope parts) and values (narrower) travel the ring as one tensor; each cp rank sends
    its chunks' tokens to the ep ranks of its cp index; the router losses read the whole sequences' routing; the
    MTP module reads the ids and labels one ahead across the chunk borders, and its cross-entropy is weighted by
    its own labels; the routing biases move by the whole batch's counts: losses, MTP losses, metrics, parameters
    and biases equal one process's."""
    moe = {"bias_update_rate": BIAS_RATE, "dispatcher": "alltoall", **ROUTER_LOSSES}
    reference = train(deepseek, {"micro_batches": 2}, moe, masked=True, mtp=1)
    results = run_ranks(train, 4, deepseek, {"dp": 2, "ep": 2, "cp": 2}, moe, masked=True, mtp=1)
    _check("deepseek-v3 dp2 ep2 cp2", results, reference)
    assert all(m > 0 for m in reference["mtp"])
    for r in results:
        assert r["mtp"] == pytest.approx(reference["mtp"], rel=LOSS_RTOL)
        for name, t in reference["buffers"].items():
            assert torch.equal(r["buffers"][name], t), name
