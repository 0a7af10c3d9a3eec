"""Context parallelism's runtime plumbing: the tp-cp-dp-pp rank layout and its groups, the checks refusing a layout
the sequence or the heads cannot be split by, the engine's per-rank tokens, gradient averaging over "dp_cp", and
checkpoints that move between cp 2 and cp 1.

The attention and the loss across cp ranks are the context_parallel pass's (tests/test_context_parallel.py);
here a cp run only has to run, keep its replicas identical and save/load layout-independently.
Reproduce: python -m pytest -q tests/test_context_parallel_layout.py
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from dist_util import run_ranks

from graphllm.cli.main import EXIT_USER_ERROR, main
from graphllm.errors import GraphllmError
from graphllm.models import load_config
from graphllm.parallel import groups
from graphllm.parallel.engine import Engine
from graphllm.plan import CompilePlan
from graphllm.planning.context import cp_token_index
from graphllm.planning.layout import KIND_DIMS, Coords, Layout
from graphllm.planning.task_config import TaskConfig

TINY = load_config("tiny-llama")  # 8 attention heads, 4 key/value heads


@pytest.fixture(autouse=True)
def no_layout():
    groups.set_state(None)
    yield
    groups.set_state(None)


# ---------------------------------------------------------------- layout: ranks and groups

def test_rank_order_is_tp_then_cp_then_dp_then_pp() -> None:
    lay = Layout(tp=2, cp=2, dp=2)
    assert lay.world_size == 8 and lay.describe() == "tp2×cp2-ring×pp1×dp2"
    assert lay.coords(2) == Coords(pp=0, dp=0, cp=1, tp=0) and lay.coords(5) == Coords(pp=0, dp=1, cp=0, tp=1)
    hybrid = Layout(cp=4, cp_algo="hybrid", cp_ulysses=2, pp=2, micro_batches=2)
    assert (hybrid.ulysses_size, hybrid.ring_size) == (2, 2) and hybrid.describe() == "tp1×cp4-hybrid-u2×pp2×dp1"
    for layout in (lay, hybrid):
        assert [layout.rank_of(layout.coords(r)) for r in range(layout.world_size)] == list(range(layout.world_size))


def test_group_ranks_of_every_kind() -> None:
    lay = Layout(tp=2, cp=2, dp=2)
    assert lay.group_ranks("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lay.group_ranks("cp") == lay.group_ranks("cp_ring") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert lay.group_ranks("cp_ulysses") == [[r] for r in range(8)]
    assert lay.group_ranks("dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert lay.group_ranks("dp_cp") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    hybrid = Layout(cp=4, cp_algo="hybrid", cp_ulysses=2)  # cp rank = ring rank · 2 + ulysses rank
    assert hybrid.group_ranks("cp") == hybrid.group_ranks("dp_cp") == [[0, 1, 2, 3]]
    assert hybrid.group_ranks("cp_ring") == [[0, 2], [1, 3]]
    assert hybrid.group_ranks("cp_ulysses") == [[0, 1], [2, 3]]
    for layout in (lay, hybrid, Layout(tp=2, cp=2, cp_algo="ulysses", dp=2), Layout(dp=4, ep=2, tp=2),
                   Layout(dp=2, ep=2, cp=2)):  # sizes and indices agree
        for kind in KIND_DIMS:
            for ranks in layout.group_ranks(kind):
                assert len(ranks) == layout.group_size(kind), (layout.describe(), kind)
                assert [layout.group_rank(kind, layout.coords(r)) for r in ranks] == list(range(len(ranks)))
    experts = Layout(tp=2, dp=4, ep=2)  # dp rank = edp rank · 2 + ep rank; tp fastest
    assert experts.group_ranks("ep") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert experts.group_ranks("edp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert experts.group_ranks("dp") == experts.group_ranks("dp_cp") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    with_cp = Layout(dp=2, ep=2, cp=2)  # rank = dp rank · 2 + cp rank; an expert shard's replicas: edp × cp
    assert with_cp.group_ranks("ep") == [[0, 2], [1, 3]] and with_cp.group_ranks("edp_cp") == [[0, 1], [2, 3]]
    with pytest.raises(GraphllmError, match="unknown process group kind 'xp'"):
        lay.group_ranks("xp")


def _old_groups(lay: Layout, kind: str) -> list[list[int]]:
    """The rank order and grouping before context parallelism (rank = pp·dp·tp + dp·tp + tp)."""
    found: dict[tuple, list[int]] = {}
    for r in range(lay.world_size):
        c = {"pp": r // (lay.dp * lay.tp), "dp": (r // lay.tp) % lay.dp, "tp": r % lay.tp}
        found.setdefault(tuple(v for k, v in c.items() if k != kind), []).append(r)
    return [found[k] for k in sorted(found)]


@pytest.mark.parametrize("layout", [dict(tp=2, pp=2, dp=2, micro_batches=2), dict(tp=4, dp=2),
                                    dict(pp=4, micro_batches=4)])
def test_cp1_keeps_the_ranks_groups_and_description(layout) -> None:
    lay = Layout(**layout)
    for kind in ("tp", "dp", "pp"):
        assert lay.group_ranks(kind) == _old_groups(lay, kind), kind
    assert lay.group_ranks("dp_cp") == lay.group_ranks("dp") and lay.grad_kind == "dp"
    assert lay.world_size == lay.tp * lay.pp * lay.dp
    assert "cp" not in lay.describe()


def test_gradients_are_reduced_in_graph_over_the_replicas() -> None:
    assert Layout(cp=2).grads_reduced_in_graph and Layout(cp=2).grad_kind == "dp_cp"
    assert not Layout(cp=2, micro_batches=2).grads_reduced_in_graph
    assert Layout(cp=2, dp=2).group_size("dp_cp") == 4


# ---------------------------------------------------------------- bad input: one line naming the flag

OPTION_ERRORS = [
    (dict(cp=4, cp_algo="hybrid", cp_ulysses=3), "--cp-ulysses 3"),
    (dict(cp=4, cp_algo="hybrid"), "--cp-ulysses 1"),
    (dict(cp=4, cp_algo="hybrid", cp_ulysses=4), "--cp-ulysses 4"),
    (dict(cp=2, cp_ulysses=2), "--cp-ulysses 2 applies only to --cp-algo hybrid"),
    (dict(cp_algo="ulysses"), "--cp-algo ulysses needs --cp > 1"),
]


@pytest.mark.parametrize("layout, needle", OPTION_ERRORS)
def test_bad_cp_options_are_refused(layout, needle) -> None:
    with pytest.raises(GraphllmError) as info:
        Layout(**layout)
    assert needle in str(info.value) and "\n" not in str(info.value)


KV6 = SimpleNamespace(num_attention_heads=12, num_key_value_heads=4, intermediate_size=64, vocab_size=96,
                      num_hidden_layers=2)
"""12 heads, 4 kv heads: Ulysses over 6 ranks splits the heads but neither splits nor replicates the kv heads."""
MODEL_ERRORS = [
    (dict(cp=2), TINY, 30, "--seq-len 30 is not divisible by 2·cp = 4"),
    (dict(cp=2, cp_algo="ulysses"), TINY, 31, "--seq-len 31 is not divisible by --cp 2"),
    (dict(cp=3, cp_algo="ulysses"), TINY, 33, "--cp 3: Ulysses spreads each tensor-parallel rank's 8 attention heads"),
    (dict(cp=4, cp_algo="hybrid", cp_ulysses=2, tp=8), TINY, 32,
     "--cp-ulysses 2: Ulysses spreads each tensor-parallel rank's 1"),
    (dict(cp=6, cp_algo="ulysses"), KV6, 36, "--cp 6: each tensor-parallel rank's 4 key/value heads"),
    (dict(cp=2, tp=4, sequence_parallel=True), TINY, 36, "each context-parallel rank's 18 tokens"),
]


@pytest.mark.parametrize("layout, cfg, seq, needle", MODEL_ERRORS)
def test_layouts_the_model_cannot_split_are_refused(layout, cfg, seq, needle) -> None:
    with pytest.raises(GraphllmError) as info:
        Layout(**layout).check_model(cfg, batch_size=1, seq_len=seq)
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_good_cp_layouts_pass_the_model_checks() -> None:
    for layout, seq in [(dict(cp=2), 32), (dict(cp=4, cp_algo="ulysses"), 36),
                        (dict(cp=2, cp_algo="ulysses", tp=2), 30),
                        (dict(cp=4, cp_algo="hybrid", cp_ulysses=2, tp=2), 32),
                        (dict(cp=2, tp=2, sequence_parallel=True), 36)]:
        Layout(**layout).check_model(TINY, batch_size=1, seq_len=seq)


def test_tasks_other_than_lm_are_refused_with_cp() -> None:
    with pytest.raises(GraphllmError, match="--task simpo with --cp > 1 is not supported yet"):
        CompilePlan(batch_size=2, seq_len=32, task=TaskConfig(kind="simpo"), layout=Layout(cp=2))


@pytest.mark.parametrize("flags, needle", [(["--cp", "2", "--seq-len", "30"], "--seq-len 30"),
                                           (["--cp", "2", "--cp-ulysses", "2"], "--cp-ulysses 2")])
def test_cli_refuses_a_bad_cp_layout_in_one_line(flags, needle, tmp_path: Path, capsys) -> None:
    out = tmp_path / "art"
    argv = ["compile", "--model", "tiny-llama", "--backend", "eager", "--batch-size", "1", "--seq-len", "32",
            *flags, "--out", str(out)]
    assert main(argv) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("graphllm compile: error: ") and needle in err[0], err
    assert not out.exists()


# ---------------------------------------------------------------- the engine's tokens (no process groups)

def _engine(layout: Layout, rank: int, seq: int, step_fn=None, pipeline=None) -> Engine:
    st = SimpleNamespace(coords=layout.coords(rank), group=lambda kind: None)  # one rank's view, no collectives
    return Engine(layout=layout, st=st, named_params={}, step_fn=step_fn, pipeline=pipeline, micro_batch_size=2,
                  seq_len=seq)


@pytest.mark.parametrize("layout", [dict(cp=2), dict(cp=2, cp_algo="ulysses"),
                                    dict(cp=4, cp_algo="hybrid", cp_ulysses=2), dict(cp=2, dp=2)])
def test_engine_gives_each_cp_rank_its_tokens(layout) -> None:
    lay, seq = Layout(**layout), 16
    rows = 2 * lay.dp
    ids = torch.arange(rows * seq).view(rows, seq)  # [rows, seq]
    positions = torch.arange(seq).expand(rows, seq)
    reward = torch.zeros(rows, 2, dtype=torch.long)  # per-row column: rows only
    index = cp_token_index(seq, lay.cp, lay.ulysses_size)
    for rank in range(lay.world_size):
        seen = []
        eng = _engine(lay, rank, seq, step_fn=lambda *a: (seen.append(a), torch.tensor(1.0))[1])
        eng.eval_loss(ids, ids + 1, reward, positions)
        c = lay.coords(rank)
        want = ids[2 * c.dp:2 * c.dp + 2][:, index[c.cp]]
        got_ids, got_labels, got_reward, got_pos = seen[0]
        assert torch.equal(got_ids, want) and torch.equal(got_labels, want + 1), rank
        assert got_pos.tolist() == [index[c.cp]] * 2 and got_reward.shape == (2, 2)


def test_engine_gives_the_pipeline_its_tokens() -> None:
    lay, seq = Layout(cp=2, pp=2, micro_batches=2), 8
    ids = torch.arange(2 * 2 * seq).view(4, seq)
    seen = []
    runner = SimpleNamespace(forward_backward=lambda i, lab: (seen.append((i, lab)), torch.tensor(2.0))[1])
    eng = _engine(lay, lay.rank_of(Coords(pp=1, dp=0, cp=1, tp=0)), seq, pipeline=runner)
    assert eng.forward_backward(ids, ids) == 2.0
    assert torch.equal(seen[0][0], ids[:, cp_token_index(seq, 2)[1]])


def test_engine_with_cp_needs_the_sequence_length() -> None:
    with pytest.raises(GraphllmError, match="needs the plan's seq_len"):
        Engine(layout=Layout(cp=2), st=None, named_params={}, micro_batch_size=1)


def test_dp_grad_reduce_averages_over_dp_cp() -> None:
    from torch.fx.experimental.proxy_tensor import make_fx

    from graphllm.passes import PassContext
    from graphllm.passes.dp_grad_reduce import dp_grad_reduce

    names = SimpleNamespace(name=lambda kind: f"group:{kind}")
    for layout, group, divisor in [(Layout(cp=2, dp=2), "group:dp_cp", 4), (Layout(dp=2), "group:dp", 2)]:
        gm = make_fx(lambda a, b: (a * 2, b * 3), tracing_mode="fake")(torch.ones(4), torch.ones(2, 3))
        ctx = PassContext(layout=layout, groups=names, stage="train", graph_kind="backward")
        gm = dp_grad_reduce(gm, ctx)
        calls = [n for n in gm.graph.nodes if n.op == "call_function"]
        reduces = [n for n in calls if n.target is torch.ops._c10d_functional.all_reduce.default]
        divs = [n for n in calls if n.target is torch.ops.aten.div.Tensor]
        assert [n.args[2] for n in reduces] == [group] and [n.args[1] for n in divs] == [divisor]


# ---------------------------------------------------------------- real ranks: groups, a cp run, checkpoints

def _groups_worker(layout: dict) -> dict:
    import torch.distributed as dist

    st = groups.init_parallel(Layout(**layout))
    found = {k: (dist.get_process_group_ranks(st.group(k)), st.size(k), st.local_rank(k))
             for k in KIND_DIMS if st.group(k) is not None}
    return {"groups": found, "kinds": st.kinds_by_name(), "coords": st.coords}


def test_init_parallel_builds_the_cp_groups() -> None:
    lay = Layout(cp=2)
    for rank, got in enumerate(run_ranks(_groups_worker, 2, {"cp": 2})):
        assert got["coords"] == lay.coords(rank)
        for kind in ("cp", "cp_ring", "dp_cp"):
            assert got["groups"][kind] == ([0, 1], 2, rank), kind
        assert got["groups"]["dp"] == ([rank], 1, 0) and got["groups"]["cp_ulysses"] == ([rank], 1, 0)
        no_experts = set(KIND_DIMS) - {"ep", "edp", "edp_cp"}  # expert-parallel meshes are built at ep > 1 only
        assert {k for label in got["kinds"].values() for k in label.split("/")} == no_experts, got["kinds"]


def test_init_parallel_builds_the_expert_groups_under_cp() -> None:
    """ep2 carved out of dp2, with cp2 (4 ranks): the whole grid's mesh; every group of every kind is the one the
    layout lists, and an expert shard's replicas ("edp_cp") are its cp ranks."""
    lay = Layout(dp=2, ep=2, cp=2)
    for rank, got in enumerate(run_ranks(_groups_worker, 4, {"dp": 2, "ep": 2, "cp": 2})):
        assert {"ep", "edp_cp", "cp", "dp", "dp_cp"} <= set(got["groups"]), sorted(got["groups"])
        for kind, (ranks, size, local) in got["groups"].items():
            assert rank in ranks and ranks in lay.group_ranks(kind), (kind, ranks)
            assert size == lay.group_size(kind) and local == lay.group_rank(kind, lay.coords(rank)), kind


STEP_CFG = dict(lr=1e-2, warmup_steps=1, grad_clip=1.0)


def _cp2_resume_train_save(load: str, save: str) -> dict:
    """cp2: load the cp1 checkpoint `load`, train one step, save it under `save`."""
    from graphllm.job import build
    from graphllm.resume import load_step, save_step
    from graphllm.train import TrainConfig, train_steps
    from parallel_harness import batch_at, make_plan

    built = build(make_plan(cp=2))
    assert [s.name for s in built.pipeline.steps if s.name == "dp_grad_reduce"] == ["dp_grad_reduce"]
    opt = built.engine.make_optimizer(TrainConfig(steps=2, **STEP_CFG))
    start = load_step(load, built, opt)
    loaded = {n: p.detach().clone() for n, p in built.engine.named_params.items()}
    cfg = TrainConfig(steps=start + 1, **STEP_CFG)
    losses = [r["loss"] for r in train_steps(built.engine, batch_at, cfg, optimizer=opt, start_step=start)]
    save_step(save, built, opt, start + 1)
    return {"loaded": loaded, "losses": losses, "tokens": built.engine.token_index.tolist(),
            "params": {n: p.detach().clone() for n, p in built.engine.named_params.items()}}


def test_cp2_trains_and_its_checkpoints_move_between_cp1_and_cp2(tmp_path: Path) -> None:
    """One process trains a step and saves; two cp ranks load it (bit-exact), train a step (identical replicas)
    and save; the one process loads that (bit-exact)."""
    from graphllm.job import build
    from graphllm.resume import load_step, save_step
    from graphllm.train import TrainConfig, train_steps
    from parallel_harness import SEQ, batch_at, make_plan

    one = build(make_plan())
    opt = one.engine.make_optimizer(TrainConfig(steps=1, **STEP_CFG))
    list(train_steps(one.engine, batch_at, TrainConfig(steps=1, **STEP_CFG), optimizer=opt))
    first = save_step(tmp_path / "cp1", one, opt, 1)
    want = {n: p.detach().clone() for n, p in one.engine.named_params.items()}
    ranks = run_ranks(_cp2_resume_train_save, 2, str(first), str(tmp_path / "cp2"))
    for rank, r in enumerate(ranks):
        assert r["tokens"] == cp_token_index(SEQ, 2)[rank]
        assert all(torch.equal(r["loaded"][n], want[n]) for n in want), rank
        assert len(r["losses"]) == 1 and math.isfinite(r["losses"][0])
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert all(torch.equal(ranks[0]["params"][n], ranks[1]["params"][n]) for n in want)  # gradients averaged
    groups.set_state(None)
    assert load_step(tmp_path / "cp2" / "step_2", one, opt) == 2
    assert all(torch.equal(p.detach(), ranks[0]["params"][n]) for n, p in one.engine.named_params.items())


def test_tp_shards_over_a_cp_mesh_load_at_one_process(tmp_path: Path) -> None:
    """DTensor shards over the tp dimension of the five-dimensional mesh (cp2×tp2) are stored once and load at one
    process (cp1 → cp2 loading: the test above)."""
    from test_parallel_checkpoint import check_loaded, check_stored_once, load_worker, save_worker

    run_ranks(save_worker, 4, {"tp": 2, "cp": 2}, str(tmp_path), False)
    check_stored_once(tmp_path / "step_7")
    got = load_worker({}, str(tmp_path / "step_7"))
    check_loaded(got["params"], got["optim"], 0, 1)
