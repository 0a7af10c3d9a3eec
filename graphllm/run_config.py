"""What `graphllm run` does besides the optimizer and schedule: data, validation, checkpoints, metrics.

`RunConfig` is declared once (graphllm/options.py): the `graphllm run` flags and docs/options.md come
from it, and `graphllm.Trainer` takes it. `open_feed` turns its data fields into the run's batch source,
checked against the compiled graph from the artifact's plan alone, so bad data fails before compiling:
among the checks, that `--data` was tokenized with the tokenizer the model reads (plan.json's
"model" -> "tokenizer"). Without `--data` the built-in corpus is encoded with that tokenizer: the
model's own for an HF checkpoint, the built-in one for a preset. `with_model_defaults` fills the
defaults that depend on the model (the fine-tuning lr for pretrained weights).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from graphllm.errors import GraphllmError
from graphllm.options import check_fields, option, section
from graphllm.plan import CompilePlan
from graphllm.train import FINETUNE_LR, TrainConfig

log = logging.getLogger(__name__)


RUN_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def _check_run_name(value: str) -> None:
    if not value or value.startswith(".") or not set(value) <= RUN_NAME_CHARS:
        raise GraphllmError(f"--run-name {value!r} must be a folder name of letters, digits, '.', '_' or '-' "
                            "(not starting with '.')")


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
    run_name: str | None = option(None, metavar="NAME", check=_check_run_name,
                                  help="this run's folder ARTIFACT/runs/NAME/ (default: its start time, "
                                       "YYYYmmdd-HHMMSS); runs never overwrite each other's metrics")
    metrics: str | None = option(None, metavar="FILE",
                                 help="JSON-lines metrics (default ARTIFACT/runs/<run name>/metrics.jsonl)")
    tensorboard: str | None = option(None, metavar="DIR", help="also write TensorBoard scalars to DIR (needs the "
                                                                "tensorboard package)")
    deterministic: bool = option(False, help="torch.use_deterministic_algorithms and a fixed thread count: two runs "
                                             "are bitwise equal")
    threads: int | None = option(None, minimum=1, help="torch intra-op threads (default: torch's choice)")
    no_compile_cache: bool = option(False, help="compile the graphs again instead of loading the kernels the "
                                                "artifact holds (compile_cache/; same as "
                                                "GRAPHLLM_NO_COMPILE_CACHE=1)")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.reset_position_ids != self.reset_attention_mask:
            raise GraphllmError("give --reset-position-ids and --reset-attention-mask together: graphllm resets "
                                "positions and attention at the same boundaries")

    @property
    def reset(self) -> bool:
        return self.reset_position_ids


def open_feed(artifact: Path, plan: CompilePlan, vocab: int, cfg: RunConfig, *, model: dict | None = None):
    """The run's batch source, checked against the compiled graph (vocab, seq_len, EOD-reset, tokenizer, a
    valid split for --eval-interval). `model`: plan.json's "model" section (read from `artifact` when not
    given). Warnings (a match that cannot be checked) are logged only once every check has passed, so a
    refused run prints its one line alone."""
    from graphllm.data.datasets import DEFAULT_SPLIT, check_kind, open_data, parse_data_args, read_meta
    from graphllm.data.feed import BuiltinFeed, DatasetFeed
    from graphllm.data.tokenizer_match import check_data_tokenizer

    model_tok = _model_tokenizer(artifact, model)
    task = plan.task.kind
    if cfg.reset and not plan.eod_reset:
        raise GraphllmError(f"--reset-position-ids needs an artifact compiled with --eod-reset (its graph takes "
                            f"position ids); recompile {artifact} with --eod-reset")
    warnings: list[str] = []
    if cfg.data is None:
        if task != "lm":
            raise GraphllmError(f"{artifact} trains --task {task}, which needs --data: "
                                + ("pairs from `graphllm preprocess pairwise`" if plan.task.pairwise else
                                   "step-labelled data from `graphllm preprocess prm`")
                                + " (the built-in corpus is plain text)")
        if cfg.split is not None or cfg.reset:
            raise GraphllmError("--split and --reset-position-ids apply to --data datasets; give --data PREFIX")
        feed = BuiltinFeed(_corpus_batches(artifact, plan, vocab, model_tok, cfg.train.seed, warnings),
                           with_positions=plan.eod_reset)
    else:
        prefixes = parse_data_args(cfg.data)[1]
        metas = [read_meta(prefix) for prefix in prefixes]
        check_kind(prefixes, metas, task)  # the kind first: one line naming it, whatever else is wrong
        warnings += filter(None, (check_data_tokenizer(prefix, meta, model_tok, plan.model)
                                  for prefix, meta in zip(prefixes, metas)))
        splits = open_data(cfg.data, seq_len=plan.seq_len, split=cfg.split or DEFAULT_SPLIT, reset=cfg.reset,
                           vocab_size=vocab, task=task)
        if splits.packed and not plan.eod_reset:
            raise GraphllmError(f"--data {' '.join(cfg.data)} is packed (several samples per row), which needs "
                                f"position ids that restart per sample: recompile {artifact} with --eod-reset")
        if splits.overlong:
            warnings.append(f"--data {' '.join(cfg.data)}: {splits.overlong} pairs have a side longer than --seq-len "
                            f"{plan.seq_len}, cut to it (preprocess with --seq-len {plan.seq_len} to skip them)")
        feed = DatasetFeed(splits, global_batch_size=plan.global_batch_size, seed=cfg.train.seed,
                           with_positions=plan.eod_reset, reward_ids=splits.reward_ids)
    if cfg.eval_interval > 0:
        feed.valid_batches(cfg.eval_iters)  # raises when there is no valid split; the trainer asks again
    for warning in warnings:
        log.warning("%s", warning)
    return feed


def _model_tokenizer(artifact: Path, model: dict | None) -> dict | None:
    """plan.json's record of the model's tokenizer; for an artifact compiled before graphllm recorded it,
    the tokenizer the model's source holds now."""
    from graphllm.data.tokenizer_match import model_tokenizer

    if model is None:
        from graphllm.artifact import read_plan

        model = read_plan(artifact)["model"]
    if "tokenizer" in model:
        return model["tokenizer"]
    return model_tokenizer(str(model.get("source", "")))


def _corpus_batches(artifact: Path, plan: CompilePlan, vocab: int, model_tok: dict | None, seed: int,
                    warnings: list[str]):
    """The built-in corpus as TokenBatches, encoded with the model's tokenizer (the built-in one for presets
    and, with a warning added to `warnings`, for an HF directory without a tokenizer)."""
    from graphllm.data import BatchSpec, TokenBatches, builtin_token_ids, builtin_tokenizer, corpus_token_ids
    from graphllm.data.encoders import BUILTIN, load_encoder

    if model_tok is not None and model_tok["spec"] != BUILTIN:
        enc = load_encoder(model_tok["spec"])
        if enc.fingerprint() != model_tok["fingerprint"]:
            raise GraphllmError(f"the tokenizer in {model_tok['spec']} changed since {artifact} was compiled "
                                f"(fingerprint {enc.fingerprint()}, recorded {model_tok['fingerprint']}); recompile it")
        ids, what = corpus_token_ids(enc), f"{plan.model}'s tokenizer"
    else:
        if model_tok is None:
            warnings.append(f"{plan.model} has no tokenizer files: the built-in corpus is encoded with graphllm's "
                            "built-in tokenizer, whose ids mean nothing to pretrained weights; save the model's "
                            "tokenizer into it (tokenizer.save_pretrained) or pass --data")
        tok = builtin_tokenizer()
        if tok.vocab_size > vocab:
            raise GraphllmError(f"the built-in tokenizer has {tok.vocab_size} tokens but {plan.model} has a "
                                f"vocabulary of {vocab}; use a model with a larger vocab_size")
        ids, what = builtin_token_ids(tok), "the built-in tokenizer"
    if len(ids) and int(ids.max()) >= vocab:
        raise GraphllmError(f"the built-in corpus encoded with {what} holds token id {int(ids.max())} but {plan.model} "
                            f"has a vocabulary of {vocab}; give --data preprocessed for this model")
    return TokenBatches(ids, BatchSpec(batch_size=plan.global_batch_size, seq_len=plan.seq_len, seed=seed))


# -- defaults that depend on the model ----------------------------------------------------------------
def pretrained_source(model: dict) -> str | None:
    """The HF checkpoint directory the artifact's weights are loaded from (plan.json's "model" section);
    None for a preset (random init)."""
    from graphllm.models import PRESETS

    source = str(model.get("source", ""))
    return source if source not in PRESETS and Path(source).is_dir() else None


def with_model_defaults(cfg: RunConfig, model: dict) -> RunConfig:
    """`cfg` with the defaults that depend on the model: without --lr, pretrained weights train at the
    fine-tuning lr (graphllm.train.FINETUNE_LR) instead of the random-init one."""
    if not cfg.train.lr_auto or pretrained_source(model) is None:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=FINETUNE_LR, lr_auto=True))


def fine_tuning_note(cfg: RunConfig, model: dict) -> str | None:
    """For `graphllm run`'s ready line: which default lr pretrained weights get, and how to change it; None
    when --lr was given or the model is a preset."""
    source = pretrained_source(model)
    if not cfg.train.lr_auto or source is None:
        return None
    return f"pretrained weights from {source}: fine-tuning lr {FINETUNE_LR:g} (--lr to change)"
