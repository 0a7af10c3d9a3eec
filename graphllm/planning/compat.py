"""Which features compose: every refusal of a feature combination, in one list.

A `Rule` names the features it concerns, a one-line reason (docs/composability.md), when it fires and the
exact message the user sees. `check_layout` runs the layout's rules (a Layout checks itself when built, so
`Layout(sequence_parallel=True)` is refused on its own); `check_plan` the plan's (CompilePlan.__post_init__).
The first rule that fires raises `Refusal` — a GraphllmError (one line, exit 2) that carries its rule.

The features and how each is turned on (FEATURES), and the tests that cover the pairs allowed here
(graphllm/planning/compat_coverage.py), make the generated matrix: `python -m graphllm.cli.composability_doc`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from graphllm.errors import GraphllmError

PAIRWISE_TASKS = ("dpo", "simpo")


class Refusal(GraphllmError):
    """A combination of features refused by `rule`."""

    def __init__(self, rule: Rule, message: str) -> None:
        super().__init__(message)
        self.rule = rule


@dataclass(frozen=True, slots=True)
class Rule:
    features: tuple[str, ...]
    """The FEATURES it refuses together (a `needs` rule: the feature and what it needs)."""
    reason: str
    """One line for the docs: why."""
    fires: Callable[[Any], bool]
    message: Callable[[Any], str]
    """The error the user sees (kept word for word where a rule moved here from elsewhere)."""
    scope: Literal["layout", "plan"] = "plan"
    kind: Literal["refused", "needs"] = "refused"


def _msg(text: str) -> Callable[[Any], str]:
    return lambda _: text


LAYOUT_RULES: tuple[Rule, ...] = (
    Rule(("sp", "tp"), "sequence parallelism shards the tensor-parallel group's activations",
         lambda lay: lay.sequence_parallel and lay.tp == 1,
         _msg("--sequence-parallel needs --tp > 1 (it shards the tensor-parallel group's activations)"),
         scope="layout", kind="needs"),
    Rule(("zero1", "dp"), "ZeRO-1 shards optimizer states over the data-parallel group",
         lambda lay: lay.zero1 and lay.dp == 1,
         _msg("--zero1 needs --dp > 1 (it shards optimizer states over the data-parallel group)"),
         scope="layout", kind="needs"),
    Rule(("vpp", "pp"), "virtual stages interleave a pipeline", lambda lay: lay.vpp > 1 and lay.pp == 1,
         _msg("--vpp needs --pp > 1 (virtual stages interleave a pipeline)"), scope="layout", kind="needs"),
    Rule(("mc2", "tp"), "MC2 fuses tensor-parallel matmuls with their collectives", lambda lay: lay.mc2 and lay.tp == 1,
         _msg("--mc2 needs --tp > 1 (it fuses tensor-parallel matmuls with their collectives)"),
         scope="layout", kind="needs"),
    Rule(("coc", "tp"), "CoC chunks tensor-parallel collectives", lambda lay: lay.coc_parallel_num > 1 and lay.tp == 1,
         _msg("--coc-parallel-num needs --tp > 1 (it chunks tensor-parallel collectives)"), scope="layout",
         kind="needs"),
)
"""Checked by Layout.check_options, in this order, before its checks of sizes."""


def _npu(plan: Any) -> bool:
    return plan.backend in ("npu", "npu-emulated")


PLAN_RULES: tuple[Rule, ...] = (
    Rule(("params-bf16", "amp-bf16"), "bf16 parameters already give the matmuls what autocast would",
         lambda p: p.params_dtype != "fp32" and p.amp != "fp32",
         lambda p: f"--params-dtype {p.params_dtype} with --amp {p.amp}: the parameters already are {p.params_dtype}, "
                   "which is what autocast would give the matmuls; give one of them"),
    Rule(("params-bf16", "lora"), "adapters trained in bf16 with fp32 masters are untested",
         lambda p: p.params_dtype != "fp32" and p.lora.enabled,
         lambda p: f"--params-dtype {p.params_dtype} with LoRA/QLoRA is not supported yet (adapters trained in bf16 "
                   "with fp32 masters are untested); use --amp bf16"),
    Rule(("params-bf16", "cp"), "Dynamo cannot capture the context-parallel step with bf16 parameters",
         lambda p: p.params_dtype != "fp32" and p.layout.cp > 1,
         lambda p: f"--params-dtype {p.params_dtype} with --cp > 1 is not supported yet (Dynamo cannot capture the "
                   "context-parallel step: Attempt to trace generator); use --amp bf16"),
    Rule(("task-dpo", "pp"), "the pipeline's last stage computes next-token cross-entropy only",
         lambda p: p.task.kind != "lm" and p.layout.pp > 1,
         lambda p: f"--task {p.task.kind} with --pp > 1 is not supported yet (the pipeline's last stage computes "
                   "next-token cross-entropy only); use --pp 1"),
    Rule(("task-dpo", "cp"), "per-row sums over the sequence would need reducing over the cp ranks",
         lambda p: p.task.kind != "lm" and p.layout.cp > 1,
         lambda p: f"--task {p.task.kind} with --cp > 1 is not supported yet (its per-row sums over the sequence "
                   "would need reducing over the context-parallel ranks); use --cp 1"),
    Rule(("eod-reset", "pp"), "pipeline stages take no position ids", lambda p: p.eod_reset and p.layout.pp > 1,
         _msg("--eod-reset with --pp > 1 is not supported yet (pipeline stages take no position ids); use --pp 1")),
    Rule(("task-dpo", "eod-reset"), "pairs are never packed, so the graph takes no position ids",
         lambda p: p.task.kind in PAIRWISE_TASKS and p.eod_reset,
         lambda p: f"--task {p.task.kind} with --eod-reset: pairs are never packed, so the graph takes no position "
                   "ids; compile without --eod-reset"),
    Rule(("task-rm", "eod-reset"), "the reward model scores each row's last token: its rows are never packed",
         lambda p: p.task.kind == "rm" and p.eod_reset,
         _msg("--task rm with --eod-reset is not supported (the reward model scores each row's last token, so its rows "
              "are never packed and its graph takes no position ids); compile without --eod-reset")),
    Rule(("task-rm", "sp"), "the reward head reads each row's last token, which one sp rank holds",
         lambda p: p.task.kind == "rm" and p.layout.sequence_parallel,
         _msg("--task rm with --sequence-parallel is not supported yet (the reward head reads each row's last token, "
              "and under sequence parallelism one tensor-parallel rank holds it); drop --sequence-parallel")),
    Rule(("offload-activations", "npu"), "torchair has no GE converter for graphllm's host copies",
         lambda p: p.activation_offload.enabled and _npu(p),
         lambda p: f"--offload-activations {p.activation_offload.activations} with --backend {p.backend} is not "
                   "supported yet (torchair has no GE converter for graphllm's host-copy ops); use --backend "
                   "inductor or eager, or --recompute to save activation memory on the NPU"),
)
"""Checked by CompilePlan.__post_init__, in this order (the pp and cp task rules name `task-dpo` but fire for every
--task other than lm, as their messages say: TASK_ALIASES puts them in the `task-rm` cells too)."""

RULES = LAYOUT_RULES + PLAN_RULES
# the rm/prm rows of the task rules (same predicates, same messages)
TASK_ALIASES = {("task-dpo", "pp"): ("task-rm", "pp"), ("task-dpo", "cp"): ("task-rm", "cp")}


def check_layout(layout: Any) -> None:
    _check(layout, LAYOUT_RULES)


def check_plan(plan: Any) -> None:
    _check(plan, PLAN_RULES)


def _check(obj: Any, rules: tuple[Rule, ...]) -> None:
    for rule in rules:
        if rule.fires(obj):
            raise Refusal(rule, rule.message(obj))


def rule_pairs(rule: Rule) -> list[frozenset[str]]:
    """The feature pairs (matrix cells) a rule fills."""
    pairs = [frozenset(rule.features)]
    alias = TASK_ALIASES.get(rule.features)
    return pairs + ([frozenset(alias)] if alias else [])


@dataclass(frozen=True, slots=True)
class Feature:
    """A feature of the matrix: the flags that turn it on, and the same as CompilePlan overrides."""

    name: str
    flags: str
    enable: dict[str, Any]
    """CompilePlan fields (a section as a dict of its fields) on top of a plain eager plan."""
    group: str | None = None
    """Features of one group are alternatives (one recompute policy, one backend, one task)."""
    implies: tuple[str, ...] = ()
    """Features it turns on too (sp is tensor parallelism's option): their pair is no combination."""


FEATURES: tuple[Feature, ...] = (
    Feature("tp", "--tp 2", {"layout": {"tp": 2}}),
    Feature("sp", "--tp 2 --sequence-parallel", {"layout": {"tp": 2, "sequence_parallel": True}}, implies=("tp",)),
    Feature("pp", "--pp 2 --micro-batches 2", {"layout": {"pp": 2, "micro_batches": 2}}),
    Feature("vpp", "--pp 2 --vpp 2 --micro-batches 2", {"layout": {"pp": 2, "vpp": 2, "micro_batches": 2}},
            implies=("pp",)),
    Feature("dp", "--dp 2", {"layout": {"dp": 2}}),
    Feature("cp", "--cp 2", {"layout": {"cp": 2}}),
    Feature("zero1", "--dp 2 --zero1", {"layout": {"dp": 2, "zero1": True}}, implies=("dp",)),
    Feature("recompute-full", "--recompute full", {"recompute": {"policy": "full"}}, group="recompute"),
    Feature("recompute-selective", "--recompute selective", {"recompute": {"policy": "selective"}}, group="recompute"),
    Feature("recompute-budget", "--recompute budget --recompute-budget 0.5",
            {"recompute": {"policy": "budget", "budget": 0.5}}, group="recompute"),
    Feature("coc", "--tp 2 --coc-parallel-num 2", {"layout": {"tp": 2, "coc_parallel_num": 2}}, implies=("tp",)),
    Feature("mc2", "--tp 2 --mc2", {"layout": {"tp": 2, "mc2": True}}, implies=("tp",)),
    Feature("offload-activations", "--offload-activations attention",
            {"activation_offload": {"activations": "attention"}}),
    Feature("offload-optimizer", "--offload-optimizer", {"offload_optimizer": True}),
    Feature("params-bf16", "--params-dtype bf16", {"params_dtype": "bf16"}),
    Feature("amp-bf16", "--amp bf16", {"amp": "bf16"}),
    Feature("lora", "--lora-rank 8", {"lora": {"rank": 8}}, group="adapters"),
    Feature("qlora", "--lora-rank 8 --qlora", {"lora": {"rank": 8, "qlora": True}}, group="adapters",
            implies=("lora",)),
    Feature("eod-reset", "--eod-reset", {"eod_reset": True}),
    Feature("task-dpo", "--task dpo (or simpo: preference pairs)", {"task": {"kind": "dpo"}}, group="task"),
    Feature("task-rm", "--task rm (outcome reward model)", {"task": {"kind": "rm"}}, group="task"),
    Feature("fused-loss", "--fused-loss on", {"fused_loss": "on"}),
    Feature("inductor", "--backend inductor", {"backend": "inductor"}, group="backend"),
    Feature("npu", "--backend npu", {"backend": "npu"}, group="backend"),
)
"""Every feature of the composability matrix (docs/composability.md), in its order."""

FEATURE_NAMES = tuple(f.name for f in FEATURES)


def plan_fields(*names: str) -> dict[str, Any]:
    """The CompilePlan keyword arguments that turn on the named features together (sections merged), on a
    plain eager plan."""
    by_name = {f.name: f for f in FEATURES}
    out: dict[str, Any] = {"backend": "eager"}
    for name in names:
        for key, value in by_name[name].enable.items():
            out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out
