"""What `graphllm run` does besides the optimizer and schedule: data, validation, checkpoints, metrics.

`RunConfig` is declared once (graphllm/options.py): the `graphllm run` flags and docs/options.md come
from it, and `graphllm.Trainer` takes it. `open_feed` turns its data fields into the run's batch source,
checked against the compiled graph from the artifact's plan alone, so bad data fails before compiling.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from graphllm.errors import GraphllmError
from graphllm.options import check_fields, option, section
from graphllm.plan import CompilePlan
from graphllm.train import TrainConfig


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """A training run of an artifact; `graphllm run` flags map one-to-one onto these fields."""

    train: TrainConfig = section(TrainConfig, title="optimizer and schedule")
    data: list[str] | None = option(None, nargs="+", metavar="[WEIGHT] PREFIX",
                                    help="a dataset prefix (graphllm preprocess output), or weight/prefix pairs to "
                                         "blend: --data 0.7 A 0.3 B (default: the built-in corpus)")
    split: str | None = option(None, help="train,valid,test weights over documents (default 969,30,1)")
    eval_interval: int = option(0, minimum=0, help="validation loss every N steps (0: never)")
    eval_iters: int = option(10, minimum=1, help="global batches per validation")
    reset_position_ids: bool = option(False, help="pretrain: positions restart after each document's EOD (with "
                                                  "--reset-attention-mask)")
    reset_attention_mask: bool = option(False, help="pretrain: attention does not cross documents (with "
                                                    "--reset-position-ids)")
    save: str | None = option(None, metavar="ROOT", help="checkpoint root: writes ROOT/step_<N>/ (any layout can "
                                                         "load it); also on SIGTERM/SIGINT or a failing step")
    save_interval: int = option(0, minimum=0, help="save every N steps (and always after the last)")
    keep_last: int = option(0, minimum=0, help="keep only the newest N checkpoints (0: keep all)")
    load: str | None = option(None, metavar="PATH", help="resume from a checkpoint dir, or the newest under a root")
    metrics: str | None = option(None, metavar="FILE", help="JSON-lines metrics (default ARTIFACT/runs/metrics.jsonl)")
    tensorboard: str | None = option(None, metavar="DIR", help="also write TensorBoard scalars to DIR (needs the "
                                                                "tensorboard package)")
    deterministic: bool = option(False, help="torch.use_deterministic_algorithms and a fixed thread count: two runs "
                                             "are bitwise equal")
    threads: int | None = option(None, minimum=1, help="torch intra-op threads (default: torch's choice)")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.reset_position_ids != self.reset_attention_mask:
            raise GraphllmError("give --reset-position-ids and --reset-attention-mask together: graphllm resets "
                                "positions and attention at the same boundaries")

    @property
    def reset(self) -> bool:
        return self.reset_position_ids


def open_feed(artifact: Path, plan: CompilePlan, vocab: int, cfg: RunConfig):
    """The run's batch source, checked against the compiled graph (vocab, seq_len, EOD-reset)."""
    from graphllm.data.datasets import DEFAULT_SPLIT, open_data
    from graphllm.data.feed import BuiltinFeed, DatasetFeed

    seed = cfg.train.seed
    if cfg.reset and not plan.eod_reset:
        raise GraphllmError(f"--reset-position-ids needs an artifact compiled with --eod-reset (its graph takes "
                            f"position ids); recompile {artifact} with --eod-reset")
    if cfg.data is None:
        from graphllm.data import BatchSpec, TokenBatches, builtin_token_ids, builtin_tokenizer

        if cfg.split is not None or cfg.reset:
            raise GraphllmError("--split and --reset-position-ids apply to --data datasets; give --data PREFIX")
        tok = builtin_tokenizer()
        if tok.vocab_size > vocab:
            raise GraphllmError(f"the built-in tokenizer has {tok.vocab_size} tokens but {plan.model} has a "
                                f"vocabulary of {vocab}; use a model with a larger vocab_size")
        batches = TokenBatches(builtin_token_ids(tok), BatchSpec(batch_size=plan.global_batch_size,
                                                                 seq_len=plan.seq_len, seed=seed))
        return BuiltinFeed(batches, with_positions=plan.eod_reset)
    splits = open_data(cfg.data, seq_len=plan.seq_len, split=cfg.split or DEFAULT_SPLIT, reset=cfg.reset,
                       vocab_size=vocab)
    if splits.packed and not plan.eod_reset:
        raise GraphllmError(f"--data {' '.join(cfg.data)} is packed (several samples per row), which needs "
                            f"position ids that restart per sample: recompile {artifact} with --eod-reset")
    return DatasetFeed(splits, global_batch_size=plan.global_batch_size, seed=seed, with_positions=plan.eod_reset)
