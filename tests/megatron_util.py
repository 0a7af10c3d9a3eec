"""Megatron-Core on CPU ranks for tests/test_megatron_convert.py: build a GPTModel from Megatron-LM args, run it
over a tp x pp gloo world, save it the way Megatron-LM does (legacy and torch_dist).

megatron-core 0.16.1 assumes CUDA in a few places that are not about the model; each rank (only the spawned test
ranks) gets these shims, which change no arithmetic and no saved layout:
- `torch.cuda.current_device` -> the CPU (RotaryEmbedding moves its inv_freq "to the GPU" at the first forward);
- `torch.Tensor.cuda` -> the tensor itself (LanguageModule all-reduces a tied embedding's last-stage copy from
  `.cuda()` data when pp > 1);
- `torch.cuda.synchronize` -> nothing (dist_checkpointing's torch_dist writer syncs after staging to host);
- the model-parallel RNG tracker's `fork` -> a null context (it swaps CUDA RNG states around dropout, which is 0);
- an explicit causal mask is passed (the default one is built with device="cuda").
One more, for speed only: the torch_dist writer's results queue is a thread queue, not a queue of a spawned
multiprocessing Manager (a synchronous save puts and takes the results in the rank's own process): no extra
Python start per rank.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

FP32_RTOL = 1e-5
"""Megatron-Core's and graphllm's fp32 forwards of the same weights: same math, other reduction orders (and
Megatron's softmax vs sdpa); 1e-5 of the largest logit, as the repository's fp32 parity tests use."""


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def megatron_args(*, layers=4, hidden=64, ffn=96, heads=4, groups=2, padded_vocab=256, tied=False, qkv_bias=False,
                  tp=2, pp=2, theta=10000) -> argparse.Namespace:
    """Args as Megatron-LM's parse_args leaves them for a llama-style GPT (the fields the model needs, plus a
    few of the other kinds a real Namespace holds: an enum, a dtype, a tuple)."""
    from megatron.core.transformer.enums import AttnBackend

    return argparse.Namespace(
        num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
        group_query_attention=groups != heads, num_query_groups=groups, kv_channels=hidden // heads,
        max_position_embeddings=64, seq_length=64, position_embedding_type="rope", rotary_base=theta,
        rotary_percent=1.0, rotary_interleaved=False, use_rope_scaling=False, normalization="RMSNorm",
        norm_epsilon=1e-5, swiglu=True, add_bias_linear=False, add_qkv_bias=qkv_bias, num_experts=None,
        untie_embeddings_and_output_weights=not tied, padded_vocab_size=padded_vocab, make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=None,
        init_method_std=0.02, hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.float32, bf16=False,
        attention_backend=AttnBackend.auto, ckpt_format="torch", iteration=7, adam_betas=(0.9, 0.95),
        transformer_impl="local")


def _cpu_shims() -> None:
    import queue

    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.cuda.synchronize = lambda *a, **k: None
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    filesystem_async._results_queue = queue.Queue()


def gpt_from_args(args: argparse.Namespace):
    """The GPTModel (local spec) Megatron-LM's gpt builder makes from `args` for this rank's pipeline stage."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else None, kv_channels=args.kv_channels,
        normalization=args.normalization, layernorm_epsilon=args.norm_epsilon, gated_linear_unit=args.swiglu,
        activation_func=F.silu, add_bias_linear=args.add_bias_linear, add_qkv_bias=args.add_qkv_bias,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=args.init_method_std,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size, params_dtype=torch.float32,
        pipeline_dtype=torch.float32, use_cpu_initialization=True)
    return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=args.padded_vocab_size,
                    max_sequence_length=args.max_position_embeddings, pre_process=ps.is_pipeline_first_stage(),
                    post_process=ps.is_pipeline_last_stage(),
                    share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                    position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
                    rotary_base=args.rotary_base, parallel_output=False).eval()


def pipeline_logits(model, ids: torch.Tensor, hidden: int) -> torch.Tensor | None:
    """Forward over the pipeline (each stage hands [seq, batch, hidden] to the next by send/recv); the gathered
    logits [batch, seq, vocab] on the last stage, None elsewhere."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    b, s = ids.shape
    pos = torch.arange(s).expand(b, s)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)  # True: masked out
    with torch.no_grad():
        if not ps.is_pipeline_first_stage():
            h = torch.empty(s, b, hidden)
            dist.recv(h, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(h)
        out = model(ids, pos, attention_mask=mask)
        if not ps.is_pipeline_last_stage():
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
    return out


def _rank_file(save_dir: Path, it_dir: str) -> Path:
    """This rank's model_optim_rng.pt, named as Megatron-LM's get_checkpoint_name does."""
    from megatron.core import parallel_state as ps

    name = f"mp_rank_{ps.get_tensor_model_parallel_rank():02d}"
    if ps.get_pipeline_model_parallel_world_size() > 1:
        name += f"_{ps.get_pipeline_model_parallel_rank():03d}"
    return save_dir / it_dir / name / "model_optim_rng.pt"


def world(ids: torch.Tensor, written_22: str, written_11: str, native: str) -> dict:
    """Runs on 4 gloo ranks. tp=2 x pp=2: (a) load graphllm's tp2 x pp2 legacy checkpoint `written_22` into the
    model its args describe (strict) and return its logits; (b) a Megatron model of megatron_args(), seeded,
    saved under `native`/legacy (as Megatron-LM's save_checkpoint, with optimizer and RNG state) and
    `native`/torch_dist (megatron.core.dist_checkpointing.save), with its logits. Then tp=1 x pp=1 (four data-
    parallel replicas): (c) load `written_11`, logits."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    _cpu_shims()
    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), {}
    ps.initialize_model_parallel(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)

    tracker = Path(written_22) / "latest_checkpointed_iteration.txt"
    state = torch.load(_rank_file(Path(written_22), tracker.read_text().strip()), weights_only=False)
    model = gpt_from_args(state["args"])
    model.load_state_dict(state["model"], strict=True)
    out["written_22"] = pipeline_logits(model, ids, state["args"].hidden_size)

    args = megatron_args()
    stage = ps.get_pipeline_model_parallel_rank()
    torch.manual_seed(1234 + stage)  # TP ranks of a stage cut their shards from one master weight, as Megatron does
    model = gpt_from_args(args)
    with torch.no_grad():  # norms (replicated over TP ranks) made non-trivial, alike on a stage's TP ranks
        for name, p in model.named_parameters():
            if "layernorm" in name:
                g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{stage}".encode()))
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    legacy = _rank_file(Path(native) / "legacy", "iter_0000007")
    legacy.parent.mkdir(parents=True, exist_ok=True)
    rng = [{"random_rng_state": random.getstate(), "torch_rng_state": torch.get_rng_state()}]
    optimizer = {"optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]}}
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 7,  # generate_state_dict's entries
                "model": model.state_dict_for_save_checkpoint(), "optimizer": optimizer, "rng_state": rng}, legacy)
    dist_dir = Path(native) / "torch_dist" / "iter_0000007"
    if rank == 0:
        dist_dir.mkdir(parents=True)
        for sub in ("legacy", "torch_dist"):
            (Path(native) / sub / "latest_checkpointed_iteration.txt").write_text("7")
    dist.barrier()
    dist_checkpointing.save({"args": args, "checkpoint_version": 3.0, "iteration": 7,
                             "model": model.sharded_state_dict()}, str(dist_dir))
    out["native"] = pipeline_logits(model, ids, args.hidden_size)

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    state = torch.load(_rank_file(Path(written_11), "release"), weights_only=False)
    model = gpt_from_args(state["args"])
    model.load_state_dict(state["model"], strict=True)
    out["written_11"] = pipeline_logits(model, ids, state["args"].hidden_size)
    return out
