"""Training v1: AdamW, warmup + cosine/linear/constant LR, gradient clipping, fp32 or bf16 autocast, fixed seeds."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Protocol

import torch
from torch import nn

from graphllm.errors import GraphllmError
from graphllm.options import check_fields, option


def _positive(value: float) -> None:
    if not value > 0:
        raise GraphllmError(f"--lr must be > 0, got {value}")


RANDOM_INIT_LR = 3e-3
"""The default peak lr for a randomly initialised model (the presets): graphllm's tiny models learn fast at it."""
FINETUNE_LR = 1e-5
"""The default peak lr for pretrained weights (an HF checkpoint directory). 3e-3 wrecks a pretrained model in a
few steps; full-parameter SFT recipes use 1e-6..5e-5: LLaMA-Factory examples/train_full/llama3_full_sft.yaml and
ms-swift's full-SFT examples 1e-5, MindSpeed-LLM examples/mcore/qwen25/tune_qwen25_7b_4k_full_ptd.sh 1.25e-6
(--min-lr 1.25e-7), Stanford Alpaca 2e-5, transformers' TrainingArguments default 5e-5. 1e-5 is the middle."""


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Optimizer and schedule; `graphllm run` flags map one-to-one onto these fields."""

    steps: int = option(50, minimum=1, help="the run's total optimizer steps: resumed (--load, or an auto-resume) "
                                            "at step K it runs steps K+1..N")
    lr: float | None = option(None, check=_positive, help=(
        f"peak learning rate (after warmup); default: {RANDOM_INIT_LR:g} for a randomly initialised preset, "
        f"{FINETUNE_LR:g} (fine-tuning) for pretrained weights from an HF checkpoint directory"))
    warmup_steps: int = option(5, minimum=0, help="linear warmup from lr/warmup-steps to lr")
    min_lr_ratio: float = option(0.1, minimum=0, maximum=1, help="the decay ends at lr × min-lr-ratio")
    lr_decay_style: Literal["cosine", "linear", "constant"] = option(
        "cosine", help="after warmup: decay to lr × min-lr-ratio (cosine or linear) or keep lr")
    weight_decay: float = option(0.1, minimum=0, help="AdamW decoupled weight decay (not on norms and biases)")
    beta1: float = option(0.9, flag="--adam-beta1", minimum=0, maximum=1, help="AdamW β1")
    beta2: float = option(0.95, flag="--adam-beta2", minimum=0, maximum=1, help="AdamW β2")
    eps: float = option(1e-8, flag="--adam-eps", minimum=0, help="AdamW ε")
    grad_clip: float = option(1.0, minimum=0, help="clip the global gradient norm to this (0 disables)")
    seed: int = option(0, help="seed for torch's RNG and the data order")
    log_interval: int = option(1, minimum=1, help="write a metrics line every N steps")
    lr_auto: bool = field(default=False, repr=False)
    """True when `lr` is a default rather than the user's (lr=None was given): `graphllm run` may then pick
    the fine-tuning default for pretrained weights (graphllm.run_config.with_model_defaults). Not an option."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.lr is None:  # "not given": the random-init default until the model says otherwise
            self.lr, self.lr_auto = RANDOM_INIT_LR, True


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for 0-based `step`: linear warmup, then cosine or linear decay to lr * min_lr_ratio
    (or constant)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_decay_style == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.lr_decay_style == "linear":
        return cfg.lr - (cfg.lr - floor) * progress
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def decay_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW parameter groups: decay on matrices, none on norms and biases."""
    params = list({id(p): p for p in params if p.requires_grad}.values())
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with decay on matrices only; fused where the device supports it (CPU and CUDA do)."""
    return torch.optim.AdamW(decay_groups(model.parameters(), cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)


class StepEngine(Protocol):
    """What the loop needs from a rank's step (graphllm.parallel.engine.Engine)."""

    metrics: dict[str, float]
    """The last forward_backward's task metrics by name (DPO's rewards/accuracies, ...); empty for lm."""

    def forward_backward(self, input_ids: torch.Tensor, labels: torch.Tensor, *extra: torch.Tensor) -> float: ...
    def clip_grad_norm(self, max_norm: float) -> float: ...
    def make_optimizer(self, cfg: TrainConfig) -> Any: ...


BatchFn = Callable[[int], tuple[torch.Tensor, ...]]
"""step → (input_ids, labels[, a task's columns][, position_ids]), each with [global batch] rows."""


def train_steps(engine: StepEngine, batch_at: BatchFn, cfg: TrainConfig, *, optimizer: Any = None,
                start_step: int = 0, status: dict | None = None) -> Iterator[dict]:
    """Run steps start_step..cfg.steps-1; yield one metrics dict per step (loss, lr, grad norm, tokens/s, and
    the task's metrics, e.g. DPO's "rewards/accuracies", averaged over the step's rows like the loss).

    The generator pauses after each optimizer step, so a caller can checkpoint between steps. `status`
    (optional) is kept current: "completed" (optimizer steps done) and "updating" (True while the
    optimizer changes parameters: a failure then leaves a state that must not be saved).
    """
    status = status if status is not None else {}
    status.update(completed=start_step, updating=False)
    if start_step == 0:
        torch.manual_seed(cfg.seed)  # a resumed run continues the checkpoint's RNG state instead
    opt = optimizer if optimizer is not None else engine.make_optimizer(cfg)
    t_start = time.perf_counter()
    tokens_done = 0
    for step in range(start_step, cfg.steps):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = batch_at(step)
        input_ids = batch[0]
        loss_value = engine.forward_backward(*batch)
        task_metrics = dict(getattr(engine, "metrics", {}))
        expert_bias = getattr(engine, "expert_bias", None)  # (buffers, rate): aux-free MoE balancing
        if not math.isfinite(loss_value):  # before the update: parameters stay those of the last good step
            opt.zero_grad(set_to_none=True)
            raise GraphllmError(f"loss became {loss_value} at step {step + 1}; lower --lr or check the data")
        norm = engine.clip_grad_norm(cfg.grad_clip)
        status["updating"] = True
        opt.step()
        if expert_bias is not None:
            from graphllm.parallel.expert_bias import update_expert_bias

            update_expert_bias(expert_bias[0], task_metrics, expert_bias[1])
        status.update(completed=step + 1, updating=False)
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        tokens_done += input_ids.numel()
        yield {"step": step + 1, "loss": loss_value, "lr": opt.param_groups[0]["lr"], "grad_norm": float(norm),
               "step_time_s": dt, "tokens_per_s": input_ids.numel() / dt,
               "elapsed_s": time.perf_counter() - t_start, "tokens": tokens_done,
               **{k: v for k, v in task_metrics.items() if not k.startswith("_")}}  # "_": an update's input


class MetricsWriter:
    """Appends metrics as JSON lines (one object per line), flushing each so a crash loses nothing."""

    def __init__(self, path: Path | None, header: dict):
        """`path` None: write nothing (ranks other than 0)."""
        self._f = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._f = path.open("a")
        self.write({"event": "start", **header})

    def write(self, record: dict) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
