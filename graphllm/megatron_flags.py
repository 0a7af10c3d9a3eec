"""Megatron-LM / MindSpeed-LLM training flags → graphllm's compile and run options (`graphllm convert-args`).

Each mapping was checked against graphllm's option of the same meaning (docs/options.md):
- sizes: `--micro-batch-size` is `--batch-size` (rows per micro-batch); Megatron's `--global-batch-size` counts
  samples per optimizer step as graphllm's batch-size × micro-batches × dp does, so it becomes `--micro-batches
  G / (micro-batch × dp)`, dp = the launcher's ranks (nproc-per-node × nnodes) / (tp × pp × cp);
- the schedule: Megatron decays over `--lr-decay-iters` (default `--train-iters`) after warmup, from `--lr` to
  `--min-lr`: graphllm's `--lr-decay-style` over `--steps` to lr × `--min-lr-ratio`; a warmup fraction becomes
  steps. Megatron's defaults differ from graphllm's (decay linear, min-lr 0, no warmup, weight decay 0.01, β2
  0.999, seed 1234, validation every 1000 iterations of 100 batches): they are written out;
- `--data-path PREFIX` (or weight/prefix pairs) names a Megatron indexed dataset (.bin/.idx), which graphllm reads
  as it is (graphllm/data/indexed.py); `--tokenizer-name-or-path` is the Hugging Face directory graphllm compiles
  (`--model`: architecture, weights and tokenizer); the architecture flags are read from its config.json instead;
- `--load` of a Megatron checkpoint has no equivalent (graphllm resumes its own checkpoints) unless it is `--save`.
A flag is translated, needs no flag (graphllm does it anyway), or is listed as not translated with the reason:
no equivalent, not yet supported, or value not understood.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphllm.launch_script import Script, launcher_ranks, split_flags

NUMBER = re.compile(r"\d+(\.\d*)?([eE][-+]?\d+)?|\.\d+([eE][-+]?\d+)?")
NO_EQUIVALENT, NOT_SUPPORTED, NOT_UNDERSTOOD = "no equivalent", "not yet supported", "value not understood"
MEGATRON_DEFAULTS = {"--lr-decay-style": "linear", "--min-lr": "0.0", "--lr-warmup-iters": "0", "--weight-decay": "0.01",
                     "--adam-beta2": "0.999", "--seed": "1234"}
"""Megatron's defaults where graphllm's differ (megatron/training/arguments.py): written out when the script omits them."""
EVAL_DEFAULTS = {"--eval-interval": "1000", "--eval-iters": "100"}
DIRECT = {  # flag: (command, option path, type)
    "--tensor-model-parallel-size": ("compile", ("layout", "tp"), int),
    "--pipeline-model-parallel-size": ("compile", ("layout", "pp"), int),
    "--virtual-pipeline-model-parallel-size": ("compile", ("layout", "vpp"), int),
    "--context-parallel-size": ("compile", ("layout", "cp"), int),
    "--ulysses-degree-in-cp": ("compile", ("layout", "cp_ulysses"), int),
    "--micro-batch-size": ("compile", ("batch_size",), int),
    "--seq-length": ("compile", ("seq_len",), int),
    "--seed": ("compile", ("seed",), int),
    "--lr": ("run", ("train", "lr"), float),
    "--weight-decay": ("run", ("train", "weight_decay"), float),
    "--adam-beta1": ("run", ("train", "beta1"), float),
    "--adam-beta2": ("run", ("train", "beta2"), float),
    "--adam-eps": ("run", ("train", "eps"), float),
    "--clip-grad": ("run", ("train", "grad_clip"), float),
    "--train-iters": ("run", ("train", "steps"), int),
    "--lr-warmup-iters": ("run", ("train", "warmup_steps"), int),
    "--log-interval": ("run", ("train", "log_interval"), int),
    "--save": ("run", ("save",), str),
    "--save-interval": ("run", ("save_interval",), int),
    "--eval-interval": ("run", ("eval_interval",), int),
    "--eval-iters": ("run", ("eval_iters",), int),
    "--tensorboard-dir": ("run", ("tensorboard",), str),
}
SWITCHES = {"--sequence-parallel": ("layout", "sequence_parallel"), "--use-distributed-optimizer": ("layout", "zero1"),
            "--use-mc2": ("layout", "mc2"), "--bf16": ("amp",)}
CHOICES = {"--context-parallel-algo": (("layout", "cp_algo"), {"megatron_cp_algo": "ring", "ulysses_cp_algo": "ulysses",
                                                               "hybrid_cp_algo": "hybrid"}),
           "--lr-decay-style": (("train", "lr_decay_style"), {s: s for s in ("cosine", "linear", "constant")})}
FROM_MODEL = frozenset(
    "num-layers hidden-size ffn-hidden-size num-attention-heads group-query-attention num-query-groups kv-channels "
    "max-position-embeddings position-embedding-type use-rotary-position-embeddings rotary-base rotary-percent "
    "rope-scaling-type rope-scaling-factor normalization norm-epsilon swiglu untie-embeddings-and-output-weights "
    "disable-bias-linear add-qkv-bias qk-layernorm make-vocab-size-divisible-by padded-vocab-size vocab-size "
    "tokenizer-type tokenizer-model vocab-file merge-file init-method-std apply-query-key-layer-scaling "
    "prompt-type tokenizer-padding-side".split())
"""The architecture and tokenizer: graphllm reads them from --model's config.json and tokenizer files."""
NO_FLAG = {
    "graphllm's fusion passes make these ops themselves": "use-flash-attn use-fusion-attn-v2 use-fused-rmsnorm "
    "use-fused-swiglu use-fused-rotary-pos-emb use-fused-ring-attention-update no-masked-softmax-fusion "
    "masked-softmax-fusion no-bias-gelu-fusion no-bias-dropout-fusion bias-swiglu-fusion no-rope-fusion "
    "no-gradient-accumulation-fusion gradient-accumulation-fusion attention-softmax-in-fp32 "
    "accumulate-allreduce-grads-in-fp32",
    "graphllm starts from --model's weights with a fresh optimizer and RNG": "finetune no-load-optim no-load-rng",
    "graphllm's data-parallel gradient all-reduces run inside the backward graph": "overlap-grad-reduce",
    "loss scaling is for fp16; bf16 and fp32 need none": "initial-loss-scale loss-scale loss-scale-window",
    "settings of Megatron's runtime that graphllm does not have": "distributed-backend use-mcore-models "
    "use-legacy-models transformer-impl no-shared-storage use-cpu-initialization log-throughput ckpt-format "
    "exit-on-missing-checkpoint num-workers",
}


@dataclass
class Skipped:
    flag: str
    """The flag with its values, as the script gives them."""
    kind: str
    why: str


@dataclass
class Job:
    """A launch script in graphllm's terms."""

    script: Script
    compile: dict[tuple[str, ...], Any] = field(default_factory=dict)
    """CompilePlan option path → value."""
    run: dict[tuple[str, ...], Any] = field(default_factory=dict)
    """RunConfig option path → value."""
    notes: list[str] = field(default_factory=list)
    from_model: list[str] = field(default_factory=list)
    no_flag: list[tuple[str, str]] = field(default_factory=list)
    untranslated: list[Skipped] = field(default_factory=list)
    nnodes: int | None = 1
    nproc_per_node: int | None = None


def _shown(flag: str, values: list[str]) -> str:
    return " ".join([flag, *map(shlex.quote, values)])


class _Translation:
    """One script's flags, consumed as they are translated; what is left is reported."""

    def __init__(self, script: Script) -> None:
        self.flags, stray = split_flags(script.args)
        self.job = Job(script=script)
        self.left = dict(self.flags)
        self.defaults: set[str] = set()
        """Flags `_defaults` wrote out: Megatron's defaults."""
        for word in stray:
            self.skip(word, [], NOT_UNDERSTOOD, "a word before any flag")

    def has(self, flag: str) -> bool:
        return flag in self.flags

    def take(self, flag: str) -> list[str] | None:
        self.left.pop(flag, None)
        return self.flags.get(flag)

    def skip(self, flag: str, values: list[str] | None, kind: str, why: str) -> None:
        self.left.pop(flag, None)
        self.job.untranslated.append(Skipped(_shown(flag, values or []), kind, why))

    def number(self, flag: str, kind: type = int) -> Any:
        """The flag's one value as `kind`; None (reported) when absent or not such a number."""
        text = self.word(flag, f"one {'integer' if kind is int else 'number'}")
        try:
            return None if text is None else kind(text)
        except ValueError:
            self.skip(flag, [text], NOT_UNDERSTOOD, f"expected one {'integer' if kind is int else 'number'}")
            return None

    def word(self, flag: str, expected: str = "one value") -> str | None:
        """The flag's one value; None (reported) when absent, several words or holding an unexpanded part."""
        values = self.take(flag)
        if values is None:
            return None
        unexpanded = [u for u in self.job.script.unexpanded if any(u in v for v in values)]
        if len(values) == 1 and not unexpanded:
            return values[0]
        self.skip(flag, values, NOT_UNDERSTOOD, f"uses {', '.join(unexpanded)}, which convert-args does not expand"
                  if unexpanded else f"expected {expected}, got {len(values)} words")
        return None

    def set(self, command: str, path: tuple[str, ...], value: Any) -> None:
        (self.job.compile if command == "compile" else self.job.run)[path] = value


def translate(script: Script) -> Job:
    """The graphllm options a launch script's flags mean (module docstring)."""
    t = _Translation(script)
    _defaults(t)
    for flag, (command, path, kind) in DIRECT.items():
        if (value := t.number(flag, kind) if kind is not str else t.word(flag)) is not None:
            t.set(command, path, value)
    if t.job.compile.get(("seed",)) is not None:
        t.set("run", ("train", "seed"), t.job.compile[("seed",)])
    for flag, path in SWITCHES.items():
        if t.take(flag) is not None:
            t.set("compile", path, "bf16" if flag == "--bf16" else True)
    if t.job.compile.get(("layout", "tp"), 1) == 1 and t.job.compile.pop(("layout", "sequence_parallel"), False):
        t.job.no_flag.append(("--sequence-parallel", "Megatron turns it off at tensor-parallel size 1"))
    for flag, (path, names) in CHOICES.items():
        if (value := t.word(flag)) is not None:
            if value in names:
                t.set("compile" if path[0] == "layout" else "run", path, names[value])
            else:
                t.skip(flag, [value], NOT_SUPPORTED, f"graphllm has {', '.join(sorted(set(names)))}")
    for rule in (_schedule, _batch, _virtual_pipeline, _recompute, _data, _model, _checkpoints, _coc, _misc):
        rule(t)
    _leftovers(t)
    return t.job


def _defaults(t: _Translation) -> None:
    """Megatron's defaults where graphllm's differ, for flags the script leaves out."""
    written = []
    for flag, value in MEGATRON_DEFAULTS.items():
        if flag not in t.flags and not (flag == "--lr-warmup-iters" and t.has("--lr-warmup-fraction")) and not (
                flag == "--min-lr" and not t.has("--lr")):
            t.flags[flag] = t.left[flag] = [value]
            t.defaults.add(flag)
            written.append(f"{flag} {value}")
    split = (t.flags.get("--split") or ["969,30,1"])[0].replace("/", ",").split(",")
    if t.has("--data-path") and len(split) > 1 and split[1].strip() not in ("0", "0.0", ""):
        for flag, value in EVAL_DEFAULTS.items():  # Megatron validates on its valid split; graphllm only when asked
            if flag not in t.flags:
                t.flags[flag] = t.left[flag] = [value]
                written.append(f"{flag} {value}")
    if written:
        t.job.notes.append(f"Megatron's defaults, which graphllm's differ from, written out: {', '.join(written)}")


def _schedule(t: _Translation) -> None:
    """--min-lr as a ratio of --lr, a warmup fraction as steps, --lr-decay-iters against --train-iters."""
    lr, steps = t.job.run.get(("train", "lr")), t.job.run.get(("train", "steps"))
    if (min_lr := t.number("--min-lr", float)) is not None:
        if lr and 0 <= min_lr <= lr:
            t.set("run", ("train", "min_lr_ratio"), round(min_lr / lr, 12))
        elif "--min-lr" not in t.defaults:  # Megatron's 0 needs no report when --lr is not understood
            t.skip("--min-lr", [str(min_lr)], NOT_UNDERSTOOD, "graphllm needs 0 ≤ --min-lr ≤ --lr (a ratio of it)")
    if (fraction := t.number("--lr-warmup-fraction", float)) is not None:
        if steps is not None:
            t.set("run", ("train", "warmup_steps"), round(fraction * steps))
            t.job.notes.append(f"--lr-warmup-fraction {fraction:g} of {steps} steps: --warmup-steps "
                               f"{round(fraction * steps)}")
        else:
            t.skip("--lr-warmup-fraction", [str(fraction)], NOT_UNDERSTOOD, "needs --train-iters to count steps")
    if (decay := t.number("--lr-decay-iters")) is not None and decay != steps:
        t.skip("--lr-decay-iters", [str(decay)], NOT_SUPPORTED, "graphllm decays over --steps (--train-iters)")
    for flag in ("--train-samples", "--lr-decay-samples", "--lr-warmup-samples", "--lr-warmup-init"):
        if t.has(flag):
            t.skip(flag, t.take(flag), NOT_SUPPORTED, "graphllm's schedule counts steps, from lr/warmup")


def _batch(t: _Translation) -> None:
    """dp from the launcher's ranks; --global-batch-size as micro-batches."""
    layout = {k[1]: v for k, v in t.job.compile.items() if k[0] == "layout"}
    model_ranks = layout.get("tp", 1) * layout.get("pp", 1) * layout.get("cp", 1)
    t.job.nproc_per_node, t.job.nnodes = launcher_ranks(t.job.script)
    nproc, nnodes, dp = t.job.nproc_per_node, t.job.nnodes, None
    world = None if nproc is None or nnodes is None else nproc * nnodes
    if world is not None and world % model_ranks == 0:
        dp = world // model_ranks
        t.job.notes.append(f"{world} ranks ({shlex.join(t.job.script.launcher[:1])}): dp = {world} / (tp × pp × cp = "
                           f"{model_ranks}) = {dp}")
        if dp > 1:
            t.set("compile", ("layout", "dp"), dp)
    elif world is not None:
        t.job.notes.append(f"the launcher's {world} ranks are not a multiple of tp × pp × cp = {model_ranks}")
    if (gbs := t.number("--global-batch-size")) is None:
        return
    mbs = t.job.compile.get(("batch_size",), None if t.has("--micro-batch-size") else 1)
    if mbs is None:
        t.skip("--global-batch-size", [str(gbs)], NOT_UNDERSTOOD, "--micro-batch-size was not understood")
    elif dp is None:
        t.skip("--global-batch-size", [str(gbs)], NOT_UNDERSTOOD, "the data-parallel size is unknown (the launcher's "
               "--nproc_per_node × --nnodes is not set in the script); give --dp and --micro-batches yourself")
    elif gbs % (mbs * dp):
        t.skip("--global-batch-size", [str(gbs)], NOT_UNDERSTOOD, f"not a multiple of micro-batch {mbs} × dp {dp}")
    elif gbs // (mbs * dp) > 1:
        t.set("compile", ("layout", "micro_batches"), gbs // (mbs * dp))


def _virtual_pipeline(t: _Translation) -> None:
    per_stage = t.number("--num-layers-per-virtual-pipeline-stage")
    if per_stage is None:
        return
    layers, pp = (t.flags.get("--num-layers") or ["?"])[0], t.job.compile.get(("layout", "pp"), 1)
    if layers.isdigit() and per_stage > 0 and int(layers) % (pp * per_stage) == 0:
        t.set("compile", ("layout", "vpp"), int(layers) // (pp * per_stage))
    else:
        t.skip("--num-layers-per-virtual-pipeline-stage", [str(per_stage)], NOT_UNDERSTOOD,
               f"--num-layers {layers} is not a multiple of pp {pp} × {per_stage}")


def _recompute(t: _Translation) -> None:
    """--recompute-granularity full (method, layers) or selective (core attention; MindSpeed's activation, norm)."""
    granularity = t.word("--recompute-granularity")
    if granularity not in (None, "full", "selective"):
        t.skip("--recompute-granularity", [granularity], NOT_UNDERSTOOD, "expected full or selective")
        granularity = None
    ops = ["attention"] if granularity == "selective" or t.take("--recompute-activations") is not None else []
    ops += [op for flag, op in (("--recompute-activation-function", "activation"), ("--recompute-norm", "norm"))
            if t.take(flag) is not None]
    if granularity == "full":
        t.set("compile", ("recompute", "policy"), "full")
        if (method := t.word("--recompute-method")) in ("uniform", "block"):
            t.set("compile", ("recompute", "method"), method)
        elif method is not None:
            t.skip("--recompute-method", [method], NOT_UNDERSTOOD, "expected uniform or block")
        if (layers := t.number("--recompute-num-layers")) is not None:
            t.set("compile", ("recompute", "layers"), layers)
    elif ops:
        t.set("compile", ("recompute", "policy"), "selective")
        t.set("compile", ("recompute", "ops"), ops)
    for flag in ("--recompute-method", "--recompute-num-layers", "--recompute-activation-function-num-layers",
                 "--recompute-norm-num-layers"):
        if flag in t.left:
            t.skip(flag, t.take(flag), NOT_SUPPORTED, "graphllm takes it with --recompute full only")


def _data(t: _Translation) -> None:
    values = t.take("--data-path")
    if values is None:
        return
    if t.has("--is-instruction-dataset"):
        why = ("MindSpeed's instruction datasets are laid out otherwise; preprocess the raw records with "
               "`graphllm preprocess alpaca|sharegpt` and give that prefix to --data")
        t.skip("--data-path", values, NOT_SUPPORTED, why)
        t.skip("--is-instruction-dataset", [], NOT_SUPPORTED, why)
        return
    if len(values) == 1 or (len(values) % 2 == 0 and all(NUMBER.fullmatch(w) for w in values[0::2])):
        t.set("run", ("data",), values)
        t.job.notes.append("--data reads the Megatron indexed dataset (.bin/.idx) as it is; without graphllm's "
                           "_meta.json it cannot check the dataset's tokenizer against --model's")
    else:
        t.skip("--data-path", values, NOT_UNDERSTOOD, "expected one prefix or weight/prefix pairs")
    if (split := t.word("--split")) is not None:
        t.set("run", ("split",), split.replace(" ", ""))
    for flag in ("--train-data-path", "--valid-data-path", "--test-data-path"):
        if t.has(flag):
            t.skip(flag, t.take(flag), NOT_SUPPORTED, "graphllm splits one --data by --split")


def _model(t: _Translation) -> None:
    """--model: the Hugging Face directory (--tokenizer-name-or-path, else --tokenizer-model's folder); a
    MindSpeed script's Ascend set-up: --backend npu, else a GPU: --device cuda."""
    source = "--tokenizer-name-or-path" if t.has("--tokenizer-name-or-path") else "--tokenizer-model"
    path = (t.word(source) if source == "--tokenizer-name-or-path" else (t.flags.get(source) or [None])[0])
    if path is not None and Path(path).suffix in (".model", ".json"):
        path = str(Path(path).parent)
    if path is None:
        t.set("compile", ("model",), "HF_MODEL_DIR")
        t.job.notes.append("the script names no Hugging Face directory (--tokenizer-name-or-path): replace "
                           "HF_MODEL_DIR with the model's (graphllm reads its config.json, weights and tokenizer)")
    else:
        t.set("compile", ("model",), path)
        t.job.notes.append(f"--model from {source}: graphllm reads the architecture, weights and tokenizer from that "
                           "Hugging Face directory")
    if t.job.script.ascend:
        t.set("compile", ("backend",), "npu")
        t.job.notes.append("--backend npu: the script sets up Ascend (set_env.sh, HCCL, MindSpeed or npu settings)")
    else:
        t.set("compile", ("device",), "cuda")
        t.job.notes.append("--device cuda: a Megatron-LM script for GPUs (no Ascend set-up in it)")
    if t.has("--fp16"):
        t.skip("--fp16", t.take("--fp16"), NOT_SUPPORTED, "graphllm trains in fp32 or bf16 (--amp bf16)")
    t.job.from_model = [_shown(f, t.take(f) or []) for f in list(t.left) if f[2:] in FROM_MODEL]


def _checkpoints(t: _Translation) -> None:
    load, save = t.take("--load"), t.job.run.get(("save",))
    if load is None:
        return
    if load == [save]:
        t.job.notes.append("--load is --save: graphllm resumes from the newest checkpoint under --save by itself")
    elif (src := t.word("--load", "one directory")) is not None:  # a Megatron checkpoint, converted once
        t.set("run", ("load",), out := src.rstrip("/") + "_graphllm")
        hf = t.job.compile.get(("model",))
        cmd = ["graphllm", "convert", "megatron-to-graphllm", "--megatron", src, "--out", out, *(["--hf-config", hf] if hf else [])]
        t.job.notes.append(f"--load {src} is a Megatron checkpoint: convert it first with `{shlex.join(cmd)}` "
                           "(docs/megatron.md); `graphllm run --load` then starts from its weights")


def _coc(t: _Translation) -> None:
    """MindSpeed's communication-over-computation: --use-ascend-coc with --coc-parallel-num N."""
    use = t.take("--use-ascend-coc") is not None
    chunks = t.number("--coc-parallel-num")
    if use and chunks is not None:
        t.set("compile", ("layout", "coc_parallel_num"), chunks)
    elif use or chunks is not None:
        t.job.no_flag.append(("--use-ascend-coc" if use else f"--coc-parallel-num {chunks}",
                              "no effect without " + ("--coc-parallel-num > 1" if use else "--use-ascend-coc")))
    for flag in ("--coc-mode", "--coc-fused-kernel"):
        if t.has(flag):
            t.skip(flag, t.take(flag), NOT_SUPPORTED, "graphllm's coc pass has one mode: chunked, interleaved")


def _misc(t: _Translation) -> None:
    """Reset of positions/attention at EOD (both, with --eod-reset); dropout, which graphllm's models do not have."""
    resets = [f for f in ("--reset-position-ids", "--reset-attention-mask") if t.take(f) is not None]
    if len(resets) == 2:
        t.set("compile", ("eod_reset",), True)
        t.set("run", ("reset_position_ids",), True)
        t.set("run", ("reset_attention_mask",), True)
    elif resets:
        t.skip(resets[0], [], NOT_SUPPORTED, "graphllm resets positions and attention together: give both")
    for flag in ("--attention-dropout", "--hidden-dropout"):
        if flag in t.flags:
            values = t.take(flag) or []
            if values in (["0"], ["0.0"]):
                t.job.no_flag.append((_shown(flag, values), "graphllm's models have no dropout"))
            else:
                t.skip(flag, values, NOT_SUPPORTED, "graphllm's models have no dropout")


def _leftovers(t: _Translation) -> None:
    no_flag = {name: why for why, names in NO_FLAG.items() for name in names.split()}
    for flag in list(t.left):
        values = t.take(flag) or []
        if flag[2:] in no_flag:
            t.job.no_flag.append((_shown(flag, values), no_flag[flag[2:]]))
        else:
            t.skip(flag, values, NO_EQUIVALENT, "graphllm has no option for it")
