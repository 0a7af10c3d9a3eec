"""Checkpoints saved under one layout load bit-exactly under another (real gloo ranks), atomically.

Every tensor is derived from a fixed seed, so the test process knows each rank's expected slice.
Reproduce: python -m pytest -q tests/test_parallel_checkpoint.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_util import run_ranks
from torch.distributed.checkpoint import FileSystemReader

from graphllm.errors import GraphllmError
from graphllm.parallel import checkpoint as ckpt
from graphllm.parallel import groups
from graphllm.parallel.groups import init_parallel
from graphllm.planning.layout import Layout
from graphllm.planning.sharding import shard_param

# name -> (full shape, dtype, tp shard dim or None for a whole tensor)
SPECS = {
    "model.embed_tokens.weight": ((8, 6), torch.float32, 0),
    "model.layers.0.self_attn.q_proj.weight": ((6, 6), torch.float32, 0),
    "model.layers.0.self_attn.o_proj.weight": ((6, 6), torch.float32, 1),
    "model.layers.0.input_layernorm.weight": ((6,), torch.float32, None),
    "model.layers.1.mlp.down_proj.weight": ((6, 4), torch.bfloat16, 1),
    "model.norm.weight": ((6,), torch.float32, None),
}
NAMES = list(SPECS)
PP_NAMES = [NAMES[:3], NAMES[3:]]  # pipeline rank -> the names it holds
STEP = 7
FINGERPRINT = "tiny-0123"


def full_params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {n: torch.randn(shape, generator=g).to(dtype) for n, (shape, dtype, _) in SPECS.items()}


def full_optim() -> dict[str, dict[str, torch.Tensor]]:
    return {n: {"exp_avg": t.float() * 0.5 + 1, "exp_avg_sq": t.float() ** 2} for n, t in full_params().items()}


def local_of(name: str, full: torch.Tensor, tp_index: int, tp: int) -> torch.Tensor:
    dim = SPECS[name][2]
    return full if dim is None or tp == 1 else full.chunk(tp, dim=dim)[tp_index]


def make_params(tp_index: int, tp: int, names, *, blank: bool) -> dict[str, torch.nn.Parameter]:
    out = {}
    for n in names:
        t = full_params()[n]
        t = torch.zeros_like(t) if blank else t
        dim = SPECS[n][2]
        out[n] = torch.nn.Parameter(t.clone()) if dim is None or tp == 1 else shard_param(torch.nn.Parameter(t), dim, tp_index, tp)
    return out


def rank_view(st) -> tuple[int, int, list[str]]:
    """(tp index, tp size, names held) of this rank."""
    if st is None:
        return 0, 1, NAMES
    names = PP_NAMES[st.coords.pp] if st.layout.pp == 2 else NAMES
    return st.coords.tp, st.layout.tp, names


def save_worker(layout: dict, path: str, also_crash: bool) -> dict:
    st = init_parallel(Layout(**layout))
    tp_i, tp, names = rank_view(st)
    params = make_params(tp_i, tp, names, blank=False)
    optim = {"step": STEP, "state": {n: {k: local_of(n, v, tp_i, tp) for k, v in s.items()}
                                     for n, s in full_optim().items() if n in names}}
    torch.manual_seed(100 + st.rank)  # per-rank RNG: only rank 0's is stored
    extra = {"torch_rng": torch.get_rng_state(), "sampler": {"epoch": 1, "position": 96}, "lr_step": STEP}
    meta = {"fingerprint": FINGERPRINT, "layout": st.layout.describe()}
    out = {"rng": extra["torch_rng"]}
    if also_crash:  # a crash after DCP wrote everything, before the rename: nothing may appear at the path
        import torch.distributed.checkpoint as dcp

        real = dcp.save

        def crashing_save(*a, **k):
            real(*a, **k)
            raise RuntimeError("simulated crash")

        dcp.save = crashing_save
        try:
            ckpt.save_checkpoint(Path(path) / "crashed", step=STEP, named_params=params, optim_state=optim,
                                 extra=extra, meta=meta, st=st)
        except RuntimeError as exc:
            out["crash"] = str(exc)
        finally:
            dcp.save = real
    target = Path(path) / f"step_{STEP}"
    ckpt.save_checkpoint(target, step=STEP, named_params=params, optim_state=optim, extra=extra, meta=meta, st=st)
    try:  # every rank must refuse, none may hang
        ckpt.save_checkpoint(target, step=STEP, named_params=params, optim_state=optim, extra=extra, meta=meta, st=st)
    except GraphllmError as exc:
        out["overwrite"] = str(exc)
    return out


def load_worker(layout: dict, path: str) -> dict:
    st = init_parallel(Layout(**layout))
    tp_i, tp, names = rank_view(st)
    params = make_params(tp_i, tp, names, blank=True)
    got = ckpt.load_checkpoint(Path(path), named_params=params, want_optim=True, st=st, expect_fingerprint=FINGERPRINT)
    return {"tp": (tp_i, tp), "params": {n: p.detach() for n, p in params.items()}, "optim": got.optim_state,
            "extra": got.extra, "step": got.step}


def check_loaded(params: dict, optim: dict | None, tp_i: int, tp: int) -> None:
    full, fopt = full_params(), full_optim()
    for n, t in params.items():
        want = local_of(n, full[n], tp_i, tp)
        assert t.dtype == want.dtype and torch.equal(t, want), n
    if optim is not None:
        assert optim["step"] == STEP
        assert set(optim["state"]) == set(params)
        for n, s in optim["state"].items():
            for k, t in s.items():
                assert torch.equal(t, local_of(n, fopt[n][k], tp_i, tp)), (n, k)


def check_stored_once(path: Path) -> None:
    """Each full tensor's chunks tile it exactly once, whatever the layout that saved it."""
    md = FileSystemReader(path).read_metadata().state_dict_metadata
    for key, entry in md.items():
        if key.startswith(("model/", "optim/model")):
            assert sum(c.sizes.numel() for c in entry.chunks) == entry.size.numel(), key


@pytest.fixture(autouse=True)
def no_layout():
    groups.set_state(None)
    yield
    groups.set_state(None)


def load_here(path: Path, **kw):
    params = make_params(0, 1, NAMES, blank=True)
    got = ckpt.load_checkpoint(path, named_params=params, want_optim=kw.pop("want_optim", True), st=None,
                               expect_fingerprint=kw.pop("expect_fingerprint", FINGERPRINT))
    return params, got


def test_tp2_save_loads_in_one_process_without_group(tmp_path):
    out = run_ranks(save_worker, 2, {"tp": 2}, str(tmp_path), True)
    assert all(o["crash"] == "simulated crash" for o in out)
    assert not (tmp_path / "crashed").exists()
    assert [p.name for p in tmp_path.iterdir()] == [f"step_{STEP}"]  # the temp directory was removed too
    assert all("refusing to overwrite" in o["overwrite"] for o in out)
    path = tmp_path / f"step_{STEP}"
    check_stored_once(path)
    params, got = load_here(path)
    check_loaded({n: p.detach() for n, p in params.items()}, got.optim_state, 0, 1)
    assert got.step == STEP and got.meta["fingerprint"] == FINGERPRINT and got.meta["layout"].startswith("tp2")
    assert torch.equal(got.extra["torch_rng"], out[0]["rng"]) and not torch.equal(out[0]["rng"], out[1]["rng"])
    assert got.extra["sampler"] == {"epoch": 1, "position": 96} and got.extra["lr_step"] == STEP


@pytest.mark.parametrize("target", [{"dp": 2}, {"tp": 2}])
def test_tp2dp2_save_loads_at_other_layouts(tmp_path_factory, target):
    root = tmp_path_factory.getbasetemp() / "tp2dp2"
    if not root.exists():  # saved once, loaded by both parametrizations
        run_ranks(save_worker, 4, {"tp": 2, "dp": 2}, str(root), False)
    path = root / f"step_{STEP}"
    check_stored_once(path)
    for r in run_ranks(load_worker, 2, target, str(path)):
        assert r["step"] == STEP and r["extra"]["lr_step"] == STEP
        check_loaded(r["params"], r["optim"], *r["tp"])


def test_pp2_save_where_ranks_hold_different_names(tmp_path):
    run_ranks(save_worker, 2, {"pp": 2, "micro_batches": 2}, str(tmp_path), False)
    path = tmp_path / f"step_{STEP}"
    params, got = load_here(path)
    check_loaded({n: p.detach() for n, p in params.items()}, got.optim_state, 0, 1)


def save_here(path: Path, step: int = STEP, optim: bool = True) -> Path:
    params = make_params(0, 1, NAMES, blank=False)
    state = {"step": step, "state": full_optim()} if optim else None
    return ckpt.save_checkpoint(path, step=step, named_params=params, optim_state=state, extra={"lr_step": step},
                                meta={"fingerprint": FINGERPRINT}, st=None)


def test_single_process_round_trip_and_sharded_target(tmp_path):
    path = save_here(tmp_path / "step_3", step=3)
    params, got = load_here(path)
    check_loaded({n: p.detach() for n, p in params.items()}, None, 0, 1)
    assert got.step == 3 and got.extra == {"lr_step": 3}
    # a sharded target without a process group loads the full tensor and keeps its slice
    p = shard_param(torch.nn.Parameter(torch.zeros(8, 6)), 0, 1, 2)
    ckpt.load_checkpoint(path, named_params={NAMES[0]: p}, want_optim=False, st=None, expect_fingerprint=None)
    assert torch.equal(p.detach(), full_params()[NAMES[0]].chunk(2)[1])


def test_errors_name_path_and_fix(tmp_path):
    path = save_here(tmp_path / "step_1", optim=False)
    with pytest.raises(GraphllmError, match="does not exist") as exc:
        load_here(tmp_path / "step_9")
    assert str(tmp_path / "step_9") in str(exc.value) and "\n" not in str(exc.value)
    (tmp_path / "junk").mkdir()
    with pytest.raises(GraphllmError, match="not a complete graphllm checkpoint"):
        load_here(tmp_path / "junk")
    with pytest.raises(GraphllmError, match="is for another model"):
        load_here(path, expect_fingerprint="other")
    with pytest.raises(GraphllmError, match="holds no optimizer state"):
        load_here(path)
    extra = {"model.extra.weight": torch.nn.Parameter(torch.zeros(2))}
    with pytest.raises(GraphllmError, match="has no parameter model.extra.weight"):
        ckpt.load_checkpoint(path, named_params=extra, want_optim=False, st=None, expect_fingerprint=None)
    wrong = {NAMES[0]: torch.nn.Parameter(torch.zeros(8, 5))}
    with pytest.raises(GraphllmError, match=r"shaped \(8, 6\) but the model's is \(8, 5\)"):
        ckpt.load_checkpoint(path, named_params=wrong, want_optim=False, st=None, expect_fingerprint=None)
    with pytest.raises(GraphllmError, match=f"{path} already holds a complete checkpoint"):
        save_here(path)
    sharded = {NAMES[0]: shard_param(torch.nn.Parameter(torch.zeros(8, 6)), 0, 0, 2)}
    with pytest.raises(GraphllmError, match="has no tp group"):
        ckpt.save_checkpoint(tmp_path / "step_2", step=2, named_params=sharded, optim_state=None, extra={}, meta={},
                             st=None)
    assert not (tmp_path / "step_2").exists()


def test_crash_before_rename_leaves_nothing(tmp_path, monkeypatch):
    before = save_here(tmp_path / "step_1")

    def crash(*a, **k):
        raise RuntimeError("simulated crash while writing the marker")

    monkeypatch.setattr(ckpt, "atomic_write", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_here(tmp_path / "step_2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1"]
    assert ckpt.latest_checkpoint(tmp_path) == before
    load_here(before)


def test_latest_and_prune(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path / "none") is None
    for s in (2, 10, 9):
        save_here(tmp_path / f"step_{s}", step=s, optim=False)
    (tmp_path / "step_11").mkdir()  # incomplete: no marker
    (tmp_path / "notes.txt").write_text("keep me")
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step_10"
    assert ckpt.prune_checkpoints(tmp_path, keep_last=2) == [tmp_path / "step_2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "step_10", "step_11", "step_9"]
    assert ckpt.prune_checkpoints(tmp_path, keep_last=1) == [tmp_path / "step_9"]
    assert ckpt.prune_checkpoints(tmp_path, keep_last=1) == []
    with pytest.raises(GraphllmError, match="--keep-last must be"):
        ckpt.prune_checkpoints(tmp_path, keep_last=0)


GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"  # a fused gate|up weight [E, 2I, H] (models/moe.py FUSED_BLOCKS)


def _save_one(path: Path, named: dict) -> Path:
    return ckpt.save_checkpoint(path, step=1, named_params=named, optim_state=None, extra={}, meta={}, st=None)


def test_fused_expert_weight_is_stored_with_its_block_axis_and_loads_block_wise(tmp_path, monkeypatch):
    """gate|up is stored [E, 2, I, H]; a block-wise expert-tensor-parallel target (no process group: the whole tensor
    is read) gets the same rows of each block; a checkpoint from before the block axis (the fused shape) still
    loads; a block-wise shard of a weight stored without a block axis is refused, one line."""
    from graphllm.parallel import stored_form
    from graphllm.planning.sharding import shard_param_nested

    full = torch.randn(4, 8, 3)
    path = _save_one(tmp_path / "step_1", {GATE_UP: torch.nn.Parameter(full.clone())})
    assert tuple(FileSystemReader(path).read_metadata().state_dict_metadata[f"model/{GATE_UP}"].size) == (4, 2, 4, 3)
    levels = [(0, 1, 2, "ep", 1), (1, 1, 2, "tp", 2)]  # experts 2..3, rows 2..3 of the gate and of the up block
    want = torch.cat([full[2:, 2:4], full[2:, 6:8]], dim=1)
    for name, saved in (("block axis", path), ("fused shape", None)):
        if saved is None:
            monkeypatch.setattr(stored_form, "FUSED_BLOCKS", {})
            saved = _save_one(tmp_path / "step_2", {GATE_UP: torch.nn.Parameter(full.clone())})
            monkeypatch.undo()
            assert tuple(FileSystemReader(saved).read_metadata().state_dict_metadata[f"model/{GATE_UP}"].size) == (4, 8, 3)
        whole, part = torch.nn.Parameter(torch.zeros(4, 8, 3)), shard_param_nested(torch.nn.Parameter(full), levels)
        part.data.zero_()
        for target in (whole, part):
            ckpt.load_checkpoint(saved, named_params={GATE_UP: target}, want_optim=False, st=None, expect_fingerprint=None)
        assert torch.equal(whole.detach(), full) and torch.equal(part.detach(), want), name
    blocked = shard_param_nested(torch.nn.Parameter(torch.zeros(4, 8, 3)), [(1, 0, 2, "tp", 2)])
    with pytest.raises(GraphllmError, match="split along dim 1 in 2 block.*no block axis") as exc:
        _save_one(tmp_path / "step_3", {"model.layers.0.mlp.other": blocked})
    assert "\n" not in str(exc.value) and not (tmp_path / "step_3").exists()
