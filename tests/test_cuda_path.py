"""The accelerator path without an accelerator: what `--device cuda` (and npu) needs of the host-side code.

No GPU here, so the step's host code runs on the `meta` device (shapes and devices, no data): a tensor the code
makes on the CPU by mistake comes out on the wrong device, or fails to mix with the meta tensors, as it would
against a GPU's (nccl rejects CPU tensors). Checked: the micro-batch loop's loss/metric accumulators, the
gradients, the global gradient norm (all of the multi-rank code path but the collectives), and ZeRO-1's
sharded update and all-gather buffer; the process-group backend per device; one device per local rank.
benchmarks/cuda_smoke.py runs the real thing on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from graphllm.errors import GraphllmError


@pytest.fixture()
def meta_model():
    from graphllm.models import load_model

    return load_model("tiny-llama").to("meta")


def test_step_host_code_keeps_every_tensor_on_the_parameters_device(meta_model) -> None:
    from graphllm.parallel.engine import Engine
    from graphllm.parallel.optim import ZeroAdamW, grad_norm
    from graphllm.planning import Layout

    named = dict(meta_model.named_parameters())
    ids = torch.zeros(4, 16, dtype=torch.long, device="meta")
    engine = Engine(layout=Layout(micro_batches=2), st=None, named_params=named, micro_batch_size=2,
                    step_fn=lambda i, lab: (meta_model(i).float().mean(), torch.zeros(2, device=i.device)),
                    metric_names=["a", "b"])
    totals = engine._micro_batches((ids, ids), backward=True)  # [loss, *metrics] accumulated over micro-batches
    assert totals.device.type == "meta" and totals.shape == (3,)
    assert {p.grad.device.type for p in named.values()} == {"meta"}
    assert grad_norm(named, None).device.type == "meta"  # was a CPU accumulator: nccl cannot reduce it
    opt = ZeroAdamW(named, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, group=None)
    opt.step()  # its range buffer and all-gather buffer were CPU tensors
    assert {p.device.type for p in meta_model.parameters()} == {"meta"}


def test_process_group_backend_per_device() -> None:
    from graphllm.parallel.groups import BACKEND_FOR_DEVICE

    # the accelerator's library for device tensors, gloo for host tensors (checkpoint gathers, objects)
    assert BACKEND_FOR_DEVICE == {"cpu": "gloo", "cuda": "cpu:gloo,cuda:nccl", "npu": "cpu:gloo,npu:hccl"}


def test_each_local_rank_takes_its_own_device(monkeypatch) -> None:
    from graphllm.parallel.groups import use_local_device

    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    use_local_device("cuda")
    use_local_device("cpu")  # nothing to choose
    assert chosen == [3]
    monkeypatch.setenv("LOCAL_RANK", "8")
    with pytest.raises(GraphllmError, match="LOCAL_RANK 8 but this node has 8 cuda device"):
        use_local_device("cuda")
