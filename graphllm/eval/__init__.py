"""Benchmark evaluation on compiled static graphs: MMLU, CEval, BoolQ, BBH, AGIEval, HumanEval.

`evaluate(scorer, EvalConfig(task=..., data=...))` reads a benchmark's local files (graphllm.eval.tasks),
builds lm-evaluation-harness prompts, scores them with a `Scorer` (`GraphScorer`: the model's forward
compiled by `graphllm.compile` at bucketed static shapes) and returns per-subject and overall metrics.
See docs/evaluation.md.
"""

from graphllm.eval.evaluate import EvalConfig, build_scorer, evaluate
from graphllm.eval.scorer import GraphScorer, Scorer
from graphllm.eval.tasks import TASKS

__all__ = ["EvalConfig", "GraphScorer", "Scorer", "TASKS", "build_scorer", "evaluate"]
