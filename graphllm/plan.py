"""The compile plan: every decision `graphllm compile` makes, as typed data (plan.json's "plan").

Each field is declared once, with its flag, help, default and checks (graphllm/options.py); the
`graphllm compile` flags, plan.json's schema and docs/options.md are generated from these declarations.
The parallel layout, the recomputation policy and the npu options are sections of their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from graphllm.errors import GraphllmError
from graphllm.models.hub import resolve_model
from graphllm.models.presets import PRESETS
from graphllm.npu_backend import NpuOptions
from graphllm.options import check_fields, from_dict, option, section, to_dict
from graphllm.planning.compat import check_plan
from graphllm.planning.layout import Layout
from graphllm.planning.lora_config import LoraConfig
from graphllm.planning.moe_config import MoeConfig
from graphllm.planning.mtp_config import MtpConfig
from graphllm.planning.offload_config import ActivationOffloadConfig
from graphllm.planning.recompute_config import RecomputeConfig
from graphllm.planning.task_config import TaskConfig


def _backend_names() -> list[str]:
    from graphllm.backends import backend_names

    return backend_names()


def _check_backend(name: str) -> None:
    from graphllm.backends import lookup_backend

    lookup_backend(name)  # unknown names: one line listing the registered ones


@dataclass(kw_only=True, slots=True)
class CompilePlan:
    """What to compile and how; `graphllm compile` flags map one-to-one onto these fields."""

    model: str = option("tiny-llama", help="a preset (tiny-llama, small-llama), an HF checkpoint directory, or a "
                                           "Hub id org/name (from the Hugging Face cache; downloaded when online)")
    batch_size: int = option(4, minimum=1, help="micro-batch size the graph is compiled for (static)")
    seq_len: int = option(128, minimum=1, help="sequence length the graph is compiled for (static)")
    backend: str = option("inductor", choices=_backend_names, check=_check_backend,
                          help="which backend compiles the forward/backward graphs")
    amp: Literal["fp32", "bf16"] = option("fp32", help="fp32, or bf16 autocast with fp32 master weights")
    params_dtype: Literal["fp32", "bf16"] = option(
        "fp32", help="the parameters' dtype, and so the gradients' and the graph's: bf16 keeps fp32 master weights "
                     "and AdamW moments in the optimizer (Megatron's O2; docs/memory.md)")
    offload_optimizer: bool = option(False, help="keep the optimizer's fp32 master weights and AdamW moments in host "
                                                 "memory between steps, streamed through the device for the step "
                                                 "(saves device memory on cuda/npu, none on cpu; docs/memory.md)")
    seed: int = option(0, help="seed for the random initialisation of preset models")
    attn_implementation: Literal["sdpa", "eager"] | None = option(
        None, help="attention form to capture (default: the model config's own)")
    eod_reset: bool = option(False, help="the graph takes position_ids (after labels): positions and attention "
                                         "reset at each packed sample (packed SFT; pretraining with "
                                         "--reset-position-ids --reset-attention-mask)")
    device: Literal["cpu", "cuda", "npu"] = option("cpu", help="where the model and batches live (npu is implied "
                                                               "by --backend npu)")
    fused_loss: Literal["auto", "on", "off"] = option(
        "auto", help="the LM head and its cross-entropy as one chunked op that never holds the [tokens, vocab] "
                     "logits: auto when the fp32 logits reach 1 GiB, on, or off")
    disable: list[str] = option([], metavar="PASS[,PASS]", help="pass names to leave out of the pipeline")
    passes: list[str] = option([], flag="--pass", repeat=True, metavar="MODULE:NAME",
                               help="append a @graph_pass from an importable module (repeatable)")
    task: TaskConfig = section(TaskConfig, title="training objective (graphllm/tasks/)")
    lora: LoraConfig = section(LoraConfig, title="low-rank adapters: LoRA, QLoRA (passes/lora.py)")
    layout: Layout = section(Layout, title="parallelism (ranks = tp × cp × pp × dp; several ranks start through "
                                           "torchrun)")
    recompute: RecomputeConfig = section(RecomputeConfig, title="activation recomputation (graphllm/recompute.py)")
    activation_offload: ActivationOffloadConfig = section(
        ActivationOffloadConfig, title="activation offload to host memory (graphllm/offload_activations.py)")
    moe: MoeConfig = section(MoeConfig, title="mixture of experts: token dispatch and expert capacity "
                                              "(passes/expert_parallel.py, passes/moe_capacity.py)")
    mtp: MtpConfig = section(MtpConfig, title="multi-token prediction (DeepSeek-V3's MTP, models/decoder.py MtpLayer)")
    npu: NpuOptions = section(NpuOptions, title="npu (torchair) options")

    def __post_init__(self) -> None:
        check_fields(self)
        self.model = resolve_model(self.model, tuple(PRESETS))  # the artifact records the snapshot directory
        if self.backend == "npu" and self.device == "cpu":
            self.device = "npu"
        if (self.device == "npu") != (self.backend == "npu"):
            raise GraphllmError(f"--device {self.device} does not fit --backend {self.backend}: the npu backend runs "
                                "on --device npu, and only there")
        self.task.check_shapes(batch_size=self.batch_size)
        check_plan(self)  # feature combinations refused with a reason: graphllm/planning/compat.py
        self.mtp.check_plan(self)
        self.moe.check_plan(self)

    @property
    def global_batch_size(self) -> int:
        """Rows of one optimizer step: micro-batch × micro-batches × data-parallel ranks."""
        return self.batch_size * self.layout.micro_batches * self.layout.dp

    def to_json(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any], source: str) -> "CompilePlan":
        """The plan from plan.json, every field checked against its declaration (one line naming a bad one)."""
        return from_dict(cls, d, source)
