"""docs/composability.md, generated from the refusal rules and the coverage registry:
`python -m graphllm.cli.composability_doc > docs/composability.md`.

Each cell is computed, not written: the two features' CompilePlan fields (graphllm/planning/compat.py FEATURES)
are merged and the plan is built — a `Refusal` makes the cell "refused" with its rule's reason; otherwise the
pair is "tested" when graphllm/planning/compat_coverage.py names a test for it, else "untested".
tests/test_composability.py fails when the file is out of date.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache
from itertools import combinations

from graphllm.planning.compat import FEATURES, RULES, Feature, Refusal, Rule, plan_fields
from graphllm.planning.compat_coverage import COVERED, ROW_KIND, ROW_TEST
from graphllm.planning.compat_rows import KNOWN_BROKEN, covering_row, pairwise_rows

SYMBOL = {"refused": "✗", "tested": "✓", "untested": "·", "implied": "⊃", "alternatives": "∥"}


@dataclass(frozen=True, slots=True)
class Cell:
    a: str
    b: str
    status: str
    """refused, tested, untested, implied (one turns the other on) or alternatives (one of a group)."""
    rule: Rule | None = None
    message: str = ""
    test: str = ""
    kind: str = ""


def cell(a: Feature, b: Feature) -> Cell:
    """What the code says of turning on `a` and `b` together."""
    if a.group is not None and a.group == b.group and not (a.name in b.implies or b.name in a.implies):
        return Cell(a.name, b.name, "alternatives")
    if a.name in b.implies or b.name in a.implies:
        return Cell(a.name, b.name, "implied")
    try:
        build_plan(a.name, b.name)
    except Refusal as r:
        return Cell(a.name, b.name, "refused", rule=r.rule, message=str(r))
    test = COVERED.get((a.name, b.name)) or COVERED.get((b.name, a.name))
    if test:
        return Cell(a.name, b.name, "tested", test=test[0], kind=test[1])
    return Cell(a.name, b.name, "untested")


def build_plan(*names: str):
    """The CompilePlan with the named features on (each section built from its fields)."""
    import dataclasses

    from graphllm.plan import CompilePlan

    sections = {f.name: f.default_factory for f in dataclasses.fields(CompilePlan)
                if f.default_factory is not dataclasses.MISSING}
    kw = {k: sections[k](**v) if isinstance(v, dict) else v for k, v in plan_fields(*names).items()}
    return CompilePlan(**kw)


@cache
def builds(names: tuple[str, ...]) -> bool:
    """Whether the plan with the named features on is allowed (no rule refuses it)."""
    try:
        build_plan(*names)
    except Refusal:
        return False
    return True


@cache
def _registered() -> dict[frozenset[str], Cell]:
    return {frozenset((a.name, b.name)): cell(a, b) for a, b in combinations(FEATURES, 2)}


@cache
def rows() -> tuple[tuple[str, ...], ...]:
    """The pairwise rows (graphllm/planning/compat_rows.py) that hold every allowed pair no registered test covers:
    tests/test_composability_rows.py trains each."""
    untested = [pair for pair, c in _registered().items() if c.status == "untested"]
    return tuple(pairwise_rows(untested, builds))


def matrix() -> dict[frozenset[str], Cell]:
    """Every pair's cell: refused, implied or alternatives by the rules; tested by a registered test or by the
    pairwise row that holds it; else untested."""
    out = dict(_registered())
    for pair, c in out.items():
        i = covering_row(list(rows()), c.a, c.b) if c.status == "untested" else None
        if i is not None:
            out[pair] = replace(c, status="tested", test=ROW_TEST.format(i), kind=ROW_KIND)
    return out


def counts(cells: dict[frozenset[str], Cell]) -> dict[str, int]:
    out = {s: 0 for s in SYMBOL}
    for c in cells.values():
        out[c.status] += 1
    return out


def render() -> str:
    cells = matrix()
    n = counts(cells)
    names = [f.name for f in FEATURES]
    lines = [
        "# Composability",
        "",
        "Generated (`python -m graphllm.cli.composability_doc > docs/composability.md`) from the refusal rules "
        "(`graphllm/planning/compat.py`) and the tests registered as covering each pair "
        "(`graphllm/planning/compat_coverage.py`); tests/test_composability.py fails when it is out of date. Each "
        "cell is computed: the two features' flags are combined into a plan and the plan is built.",
        "",
        f"{len(cells)} pairs of {len(FEATURES)} features: **{n['refused']} refused** at compile time with a one-line "
        f"reason, **{n['tested']} tested**, **{n['untested']} untested**, {n['implied']} implied (one feature turns the "
        f"other on), {n['alternatives']} alternatives (one of a group). ✗ refused, ✓ tested, · untested, ⊃ implied, "
        "∥ alternatives. A test is a *parity* test (the combination steps or trains and matches a reference), a "
        "*compile* test (it compiles and its graphs are checked: e.g. the npu dry-run), a *structure* test (the "
        "plan or pipeline it builds is checked) or a *pairwise parity* test (a generated row of many features, below, "
        "trained on gloo ranks against one process; npu rows run on the npu-emulated backend).",
        "",
        "## Features",
        "",
        "| feature | flags |",
        "|---|---|",
        *[f"| {f.name} | `{f.flags}` |" for f in FEATURES],
        "",
        "## Matrix",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for a in names:
        row = ["" if a == b else SYMBOL[cells[frozenset((a, b))].status] for b in names]
        lines.append(f"| **{a}** | " + " | ".join(row) + " |")
    lines += ["", "## Refused", "", "| features | reason | the error |", "|---|---|---|"]
    for c in (c for c in cells.values() if c.status == "refused"):
        lines.append(f"| {c.a} + {c.b} | {c.rule.reason} | {c.message} |")
    lines += ["", "Options that need another feature (refused alone, with the same one-line errors):", ""]
    lines += [f"- {r.features[0]} needs {r.features[1]}: {r.reason}" for r in RULES if r.kind == "needs"]
    lines += ["", "## Tested", "", "| features | test | kind |", "|---|---|---|"]
    for c in sorted((c for c in cells.values() if c.status == "tested"), key=lambda c: (names.index(c.a), c.b)):
        lines.append(f"| {c.a} + {c.b} | `{c.test}` | {c.kind} |")
    lines += ["", "## Pairwise rows", "", "Each row turns its features on together and trains 2 steps on gloo ranks "
              "against the same features on one process (`tests/test_composability_rows.py`); the rows are generated "
              "(`graphllm/planning/compat_rows.py`) to hold every pair no other test covers.", "",
              "| row | features |", "|---|---|"]
    lines += [f"| row{i} | {', '.join(r)} |" for i, r in enumerate(rows())]
    lines += ["", "Combinations of more than two features the rows found broken (each pair of them trains; rows avoid "
              "them until they are fixed or refused):", ""]
    lines += [f"- {' + '.join(sorted(b))}: {why}" for b, why in KNOWN_BROKEN]
    lines += ["", "## Untested", "", "Allowed, and no registered test runs them together yet; each still builds a plan "
              "and a pipeline holding both features (tests/test_composability.py::"
              "test_every_allowed_pair_builds_its_pipeline_with_both_features), but nothing checks that they step:", ""]
    untested = sorted((c for c in cells.values() if c.status == "untested"), key=lambda c: names.index(c.a))
    for a in names:
        with_a = [c.b for c in untested if c.a == a]
        if with_a:
            lines.append(f"- {a}: {', '.join(with_a)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
