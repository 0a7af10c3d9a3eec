"""tensor_parallel / sequence_parallel passes: per-rank graphs hold the right collectives, and the
sharded graph's loss and (gathered) gradients equal the unsharded graph's, on real gloo ranks."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from dist_util import run_ranks
from hf_parity import rel_err

GRAD_RTOL = 1e-5
"""fp32; the sharded graph sums the same products in another order (per-rank partial sums, then the
all-reduce), which moves results by a few ulps of the largest gradient."""
LAYERS = 4


def _model(kv_heads: int | None = None):
    from graphllm.models import PRESETS, build_model

    cfg = PRESETS["tiny-llama"]()
    if kv_heads is not None:
        cfg = dataclasses.replace(cfg, num_key_value_heads=kv_heads)
    return build_model(cfg, seed=0)


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 8000, (2, 32), generator=g), torch.randint(0, 8000, (2, 32), generator=g)


def loss_and_grads(layout: dict, kv_heads: int | None, backend: str, dump: str | None):
    """One forward/backward of the compiled (sharded when layout says so) graph on this rank."""
    from graphllm.compile import compile
    from graphllm.parallel.groups import init_parallel
    from graphllm.planning import Layout

    lay = Layout(**layout)
    st = init_parallel(lay) if lay.world_size > 1 else None
    model = _model(kv_heads)
    ids, labels = _batch()
    c = compile(model, ids, labels, backend=backend, layout=lay, groups=st, rank=st.rank if st else 0,
                dump_dir=dump if (st is None or st.rank == 0) and dump else None)
    loss = c(ids, labels)
    loss.backward()
    from graphllm.planning.sharding import shard_of

    return loss.detach(), {n: (p.grad.clone(), shard_of(p)) for n, p in model.named_parameters()}


def _check_parity(layout: dict, kv_heads=None, backend="eager", dump=None):
    ref_loss, ref = loss_and_grads({}, kv_heads, backend, None)
    outs = run_ranks(loss_and_grads, layout["tp"], layout, kv_heads, backend, dump)
    for loss, _ in outs:
        assert rel_err(loss, ref_loss) <= GRAD_RTOL
    for name, (g, _) in ref.items():
        parts = [o[1][name] for o in outs]
        shard = parts[0][1]
        full = torch.cat([p[0] for p in parts], shard.dim) if shard else parts[0][0]
        assert rel_err(full, g) <= GRAD_RTOL, name


def _calls(path, op: str) -> int:
    return len(re.findall(rf"\b{re.escape(op)}\.default\(", path.read_text()))


def test_tp2_matches_one_process_and_inserts_two_all_reduces_per_layer(tmp_path):
    _check_parity({"tp": 2}, dump=str(tmp_path))
    tp_dump = next((tmp_path / "model").glob("*_tensor_parallel.py"))
    # forward: o_proj and down_proj outputs are all-reduced; q/k/v and gate/up inputs are copied (their
    # backward all-reduces), plus the embedding's reduce and the LM head's copy
    assert _calls(tp_dump, "torch.ops.graphllm.tp_reduce") == 2 * LAYERS + 1 + 2  # + CE's sum-exp and target logit
    assert _calls(tp_dump, "torch.ops.graphllm.tp_copy") == 2 * LAYERS + 1
    assert _calls(tp_dump, "torch.ops.graphllm.tp_reduce_max") == 1
    backward = (tmp_path / "train" / "backward.py")
    assert _calls(backward, "torch.ops.graphllm.tp_reduce") == 2 * LAYERS + 1  # the copies' gradients


def test_sequence_parallel_matches_and_uses_gather_and_reduce_scatter(tmp_path):
    _check_parity({"tp": 2, "sequence_parallel": True}, dump=str(tmp_path))
    sp_dump = next((tmp_path / "model").glob("*_sequence_parallel.py"))
    assert _calls(sp_dump, "torch.ops.graphllm.sp_gather") == 2 * LAYERS + 1
    assert _calls(sp_dump, "torch.ops.graphllm.sp_reduce_scatter") == 2 * LAYERS + 1
    backward = tmp_path / "train" / "backward.py"
    assert _calls(backward, "torch.ops.graphllm.sp_gather") == 2 * LAYERS + 1
    assert _calls(backward, "torch.ops.graphllm.sp_reduce_scatter") == 2 * LAYERS + 1
    # the norms' weights see a sequence shard each: their gradients are all-reduced (2 per layer + final)
    assert _calls(backward, "torch.ops.graphllm.tp_reduce") == 2 * LAYERS + 1


def test_fewer_kv_heads_than_ranks_replicates_them():
    _check_parity({"tp": 2}, kv_heads=1)


def test_inductor_lowers_to_c10d_functional_collectives(tmp_path):
    _check_parity({"tp": 2, "sequence_parallel": True}, backend="inductor", dump=str(tmp_path))
    text = (tmp_path / "train" / "forward.py").read_text()
    assert "graphllm.sp_gather" not in text
    assert _calls(tmp_path / "train" / "forward.py", "torch.ops._c10d_functional.all_gather_into_tensor") == 2 * LAYERS + 1


def test_layout_that_does_not_divide_is_refused():
    from graphllm.errors import GraphllmError
    from graphllm.models import PRESETS
    from graphllm.planning import Layout

    cfg = PRESETS["tiny-llama"]()
    with pytest.raises(GraphllmError, match="does not divide the model's attention heads"):
        Layout(tp=3).check_model(cfg, batch_size=4, seq_len=32)
    with pytest.raises(GraphllmError, match="seq-len 31 is not divisible"):
        Layout(tp=2, sequence_parallel=True).check_model(cfg, batch_size=4, seq_len=31)
    with pytest.raises(GraphllmError, match="model has 4 layers"):
        Layout(pp=8, micro_batches=8).check_model(cfg, batch_size=4, seq_len=32)
    with pytest.raises(GraphllmError, match="needs --tp > 1"):
        Layout(sequence_parallel=True).check_options()


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_transformers_tp_plan_maps_onto_graphllms(model_type):
    from graphllm.passes.tp_plan import LLAMA_PLAN, normalize, resolve_plan

    assert resolve_plan("hf", model_type) == normalize(LLAMA_PLAN)


def test_unknown_plan_style_is_refused():
    from graphllm.errors import GraphllmError
    from graphllm.passes.tp_plan import resolve_plan

    with pytest.raises(GraphllmError, match="unknown style 'diagonal'"):
        resolve_plan({"layers.*.mlp.up_proj": "diagonal"}, "llama")
