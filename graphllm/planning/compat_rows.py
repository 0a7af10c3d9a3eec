"""Pairwise (covering-array) rows of the composability matrix: few feature sets that together hold every pair.

`pairwise_rows(pairs, builds)` greedily picks rows (sets of FEATURES names) until each pair of `pairs` is in some
row. A row takes at most one feature of a group (the alternatives), its features' implications count as in it
(sp holds tp), it needs at most MAX_WORLD ranks (tp·pp·dp·cp) and `builds(names)` must accept it — the caller
passes the plan's own check (graphllm.cli.composability_doc), so a row can never hold a refused combination.
Deterministic: candidates are drawn from a seeded generator. tests/test_composability_rows.py trains each row.
"""

from __future__ import annotations

import random
from typing import Callable, Iterable

from graphllm.planning.compat import FEATURES, plan_fields

MAX_WORLD = 4
"""Ranks a row may need: the test launches them as gloo processes on a CI machine of few cores."""
MAX_ROWS_WITH = {"inductor": 1, "npu": 3}
"""Features too slow to put in many rows: inductor compiles every graph (tens of seconds each); npu runs on the
npu-emulated backend, whose eager graphs with emulated kernels are slow."""
KNOWN_BROKEN: tuple[tuple[frozenset[str], str], ...] = (
    (frozenset({"mc2", "npu", "params-bf16", "recompute-budget"}),
     "the npu lowering of MC2 under bf16 parameters gives the budget partitioner a ScriptObject input it cannot "
     "size (torch: Cannot compute the size of FakeScriptObject); each pair of these features trains"),
    (frozenset({"cp", "eod-reset", "npu"}),
     "Dynamo refuses the step (autograd.Function.apply: duplicate tensor input); found in a row with dp, fused-loss, "
     "offload-optimizer, qlora, recompute-selective, zero1 too, not yet narrowed"),
    (frozenset({"mc2", "npu", "qlora"}),
     "no MC2 op is left in any rank's graphs (the rows with mc2 and npu but no qlora keep theirs); not yet narrowed"),
)
"""Combinations of more than two features found broken by the rows (no pair of them is: the matrix cannot show
them); rows avoid them and docs/composability.md lists them until they are fixed or refused."""
CANDIDATES = 40
"""Random row candidates tried per row; the one covering most uncovered pairs is kept."""
SEED = 0

_BY_NAME = {f.name: f for f in FEATURES}


def closure(names: Iterable[str]) -> frozenset[str]:
    """The features on in a row: the named ones and what they imply."""
    out = set(names)
    for name in list(out):
        out.update(_BY_NAME[name].implies)
    return frozenset(out)


def world_size(names: Iterable[str]) -> int:
    layout = plan_fields(*names).get("layout", {})
    n = 1
    for dim in ("tp", "pp", "dp", "cp"):
        n *= layout.get(dim, 1)
    return n


def row_pairs(row: Iterable[str]) -> set[frozenset[str]]:
    """The matrix pairs a row holds (implied features included)."""
    on = sorted(closure(row))
    return {frozenset((a, b)) for i, a in enumerate(on) for b in on[i + 1:]}


def _fits(row: frozenset[str], counts: dict[str, int], builds: Callable[[tuple[str, ...]], bool]) -> bool:
    implied = {i for n in row for i in _BY_NAME[n].implies}
    groups = [_BY_NAME[n].group for n in closure(row) - implied if _BY_NAME[n].group]
    if len(groups) != len(set(groups)) or world_size(row) > MAX_WORLD:
        return False
    if any(broken <= closure(row) for broken, _ in KNOWN_BROKEN):
        return False
    if any(counts.get(n, 0) >= cap for n, cap in MAX_ROWS_WITH.items() if n in row):
        return False
    return builds(tuple(sorted(row)))


def pairwise_rows(pairs: Iterable[frozenset[str]], builds: Callable[[tuple[str, ...]], bool],
                  seed: int = SEED) -> list[tuple[str, ...]]:
    """Rows (sorted feature names) that together hold the pairs of `pairs` (each pair must build alone) but those
    of a capped feature (MAX_ROWS_WITH) once its rows are spent. Each row starts from an uncovered pair of the
    feature with most uncovered pairs (capped features first) and grows by the features that add uncovered
    pairs; a row left on one rank gets a data-parallel dimension, so every row is compared across ranks."""
    rng = random.Random(seed)
    todo = set(pairs)
    rows: list[tuple[str, ...]] = []
    counts: dict[str, int] = {}
    while todo := {p for p in todo if _fits(p, counts, builds)}:
        left = {f.name: sum(f.name in p for p in todo) for f in FEATURES}
        first = max(left, key=lambda n: (n in MAX_ROWS_WITH and left[n] > 0, left[n]))
        seeds = sorted((p for p in todo if first in p), key=sorted)
        best, best_gain = frozenset(seeds[0]), 1
        for _ in range(CANDIDATES):
            row = frozenset(rng.choice(seeds))
            rest = [f.name for f in FEATURES if f.name not in row]
            rng.shuffle(rest)
            for name in rest:
                grown = row | {name}
                if len(row_pairs(grown) & todo) > len(row_pairs(row) & todo) and _fits(grown, counts, builds):
                    row = grown
            gain = len(row_pairs(row) & todo)
            if gain > best_gain:
                best, best_gain = row, gain
        if world_size(best) == 1:
            best = next((best | {d} for d in ("dp", "tp") if _fits(best | {d}, counts, builds)), best)
        rows.append(tuple(sorted(best)))
        for name in best:
            counts[name] = counts.get(name, 0) + 1
        todo -= row_pairs(best)
    return rows


def covering_row(rows: list[tuple[str, ...]], a: str, b: str) -> int | None:
    """The index of the first row that holds the pair (a, b), or None."""
    pair = frozenset((a, b))
    return next((i for i, row in enumerate(rows) if pair in row_pairs(row)), None)
