"""The evaluation loop: subjects of documents + a scorer → per-subject and overall metrics.

Choice tasks send every choice of every document (all subjects together) to `scorer.loglikelihood`
in one call, so the scorer batches across questions; `acc` takes the choice with the highest summed
log-probability, `acc_norm` divides it by the choice's length in characters first (the harness's
acc_norm). Generation tasks (BBH) score exact match of the greedy continuation, stripped, with the
target. Overall figures are given both micro (over all documents) and macro (mean of subjects).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphllm.eval.scorer import Scorer
from graphllm.eval.tasks import TARGET_DELIMITER, Subject

BBH_STOP = ("\n\n", "Q:")  # the harness's bbh `until` (besides the EOS token, which ends generation anyway)
BBH_MAX_NEW_TOKENS = 256


@dataclass(kw_only=True, slots=True)
class SubjectScore:
    name: str
    n: int
    metrics: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)
    """Per-document record (prediction, gold, scores) for --log-samples."""


def limited(subjects: Sequence[Subject], limit: int | None) -> list[Subject]:
    """Each subject cut to its first `limit` documents (the harness's --limit, per subject)."""
    if limit is None:
        return list(subjects)
    return [Subject(name=s.name, description=s.description, shots=s.shots, docs=s.docs[:limit]) for s in subjects]


def score_choices(scorer: Scorer, subjects: Sequence[Subject], shots: int) -> list[SubjectScore]:
    requests: list[tuple[str, str]] = []
    for s in subjects:
        for doc in s.docs:
            ctx = s.prompt(doc, shots)
            requests.extend((ctx, TARGET_DELIMITER + c) for c in doc.choices)
    results = iter(scorer.loglikelihood(requests))
    scores = []
    for s in subjects:
        hits = hits_norm = 0
        samples = []
        for doc in s.docs:
            lls = [next(results)[0] for _ in doc.choices]
            pred = max(range(len(lls)), key=lls.__getitem__)
            norm = [ll / max(len(c), 1) for ll, c in zip(lls, doc.choices)]
            pred_norm = max(range(len(norm)), key=norm.__getitem__)
            hits += pred in doc.gold
            hits_norm += pred_norm in doc.gold
            samples.append({"gold": doc.gold, "pred": pred, "pred_norm": pred_norm, "loglikelihoods": lls})
        n = len(s.docs)
        scores.append(SubjectScore(name=s.name, n=n, samples=samples,
                                   metrics={"acc": hits / n if n else 0.0, "acc_norm": hits_norm / n if n else 0.0}))
    return scores


def score_generation(scorer: Scorer, subjects: Sequence[Subject], shots: int, *,
                     max_new_tokens: int = BBH_MAX_NEW_TOKENS) -> list[SubjectScore]:
    prompts = [s.prompt(doc, shots) for s in subjects for doc in s.docs]
    outputs = iter(scorer.generate_until(prompts, list(BBH_STOP), max_new_tokens))
    scores = []
    for s in subjects:
        hits = 0
        samples = []
        for doc in s.docs:
            text = next(outputs)
            ok = text.strip() == doc.target.strip()
            hits += ok
            samples.append({"target": doc.target, "output": text, "exact_match": ok})
        n = len(s.docs)
        scores.append(SubjectScore(name=s.name, n=n, metrics={"exact_match": hits / n if n else 0.0}, samples=samples))
    return scores


def overall(scores: Sequence[SubjectScore]) -> dict[str, Any]:
    total = sum(s.n for s in scores)
    out: dict[str, Any] = {"n": total}
    for key in (scores[0].metrics if scores else {}):
        out[key] = sum(s.metrics[key] * s.n for s in scores) / total if total else 0.0
        out[f"{key}_macro"] = sum(s.metrics[key] for s in scores) / len(scores)
    return out


def group_scores(scores: Sequence[SubjectScore], group_of: dict[str, str]) -> dict[str, dict[str, Any]]:
    """`overall` of each group of subjects (MMLU's categories); subjects without a group are left out."""
    groups: dict[str, list[SubjectScore]] = {}
    for s in scores:
        if s.name in group_of:
            groups.setdefault(group_of[s.name], []).append(s)
    return {g: overall(members) for g, members in groups.items()}


def results_dict(task: str, scores: Sequence[SubjectScore], *, config: dict[str, Any], seconds: float,
                 log_samples: bool = False, groups: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    subjects = {}
    for s in scores:
        entry: dict[str, Any] = {"n": s.n, **s.metrics}
        if log_samples:
            entry["samples"] = s.samples
        subjects[s.name] = entry
    out = {"task": task, "config": config, "overall": overall(scores), "subjects": subjects}
    if groups:
        out["groups"] = groups
    out["seconds"] = round(seconds, 3)
    return out


def results_table(results: dict[str, Any]):
    """Per-subject rows, group rows and the overall rows, as a rich table."""
    from rich.table import Table

    metrics = [k for k in results["overall"] if k != "n" and not k.endswith("_macro")]
    model = results["config"].get("model")
    table = Table(title=f"{model + ': ' if model else ''}{results['task']} ({results['config'].get('shots', 0)}-shot)")
    table.add_column("subject")
    table.add_column("n", justify="right")
    for m in metrics:
        table.add_column(m, justify="right")
    names = list(results["subjects"])
    for i, name in enumerate(names):
        entry = results["subjects"][name]
        table.add_row(name, str(entry["n"]), *(f"{100 * entry[m]:.2f}" for m in metrics),
                      end_section=i == len(names) - 1)
    for name, entry in results.get("groups", {}).items():
        table.add_row(f"[italic]{name}", str(entry["n"]), *(f"{100 * entry[m]:.2f}" for m in metrics),
                      end_section=name == list(results["groups"])[-1])
    ov = results["overall"]
    table.add_row("[bold]overall (micro)", str(ov["n"]), *(f"[bold]{100 * ov[m]:.2f}" for m in metrics),
                  end_section=False)
    if len(results["subjects"]) > 1:
        table.add_row("overall (macro)", "", *(f"{100 * ov[m + '_macro']:.2f}" for m in metrics))
    return table


def write_results(results: dict[str, Any], path: Path) -> None:
    from graphllm.data.cache import atomic_write

    atomic_write(path, (json.dumps(results, indent=2, ensure_ascii=False) + "\n").encode())


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start

