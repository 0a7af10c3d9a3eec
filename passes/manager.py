"""The pass infrastructure: `graph_pass`, `PassContext`, ordering, and the checked runner.

A pass is a pure rewrite `fn(gm, ctx, **options) -> GraphModule`. Options are bound when the pipeline
is built (`my_pass.with_options(k=v)`), never threaded through the runner. Stage `model` passes run on
the captured graph before autograd; stage `train` passes run on the forward and backward graphs that
aot_autograd produces (ctx.graph_kind says which).
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import torch.fx as fx

from graphllm.errors import GraphllmError
from graphllm.ops.groups import NO_GROUPS, GroupResolver
from graphllm.planning.layout import Layout
from graphllm.planning.recompute_config import RecomputeConfig

Stage = Literal["model", "train"]
PASS_META_KEY = "graphllm_pass"  # node.meta key: the pass that created the node ("capture" for the rest)

logger = logging.getLogger("graphllm.passes")


class PassError(RuntimeError):
    """A pass failed or broke the graph; the message names it and the passes that ran before it.

    `origin`: the failing pass's module. `user_code`: for a pass that is not graphllm's own (a user
    pass), where in its code it failed ("raised at FILE:LINE in FN", or "the pass is defined at FILE:LINE"),
    so that the CLI can show that one line instead of a traceback; None for graphllm's passes, whose
    failure is a graphllm bug and keeps its traceback."""

    def __init__(self, message: str, *, origin: str | None = None, user_code: str | None = None) -> None:
        super().__init__(message)
        self.origin, self.user_code = origin, user_code


def is_graphllm_module(name: str) -> bool:
    return name == "graphllm" or name.startswith("graphllm.")


def _user_code(p: "GraphPass", tb) -> str | None:
    """Where a user pass failed: the innermost frame of `tb` in the pass's own package (its module's
    top-level name: a helper module beside the pass counts, torch and graphllm do not), else where the
    pass is defined. None for graphllm's own passes."""
    origin = getattr(p.fn, "__module__", None) or ""
    if is_graphllm_module(origin):
        return None
    top = origin.split(".")[0]
    frames = [(f, line) for f, line in traceback.walk_tb(tb)
              if str(f.f_globals.get("__name__", "")).split(".")[0] == top]
    if frames:
        frame, line = frames[-1]
        return f"raised at {frame.f_code.co_filename}:{line} in {frame.f_code.co_name}"
    code = getattr(p.fn, "__code__", None)
    return f"the pass is defined at {code.co_filename}:{code.co_firstlineno}" if code else None


@dataclass(kw_only=True, slots=True)
class PassContext:
    """What a pass may know about the compilation besides the graph: typed, never process-global state."""

    layout: Layout = field(default_factory=Layout)
    """The plan's parallel layout (tp × cp × pp × dp and its options)."""
    rank: int = 0
    """This process's rank in the layout's world (`layout.coords(rank)` is its place in each group)."""
    config: Any = None
    """The model's ModelConfig (head counts, hidden size, ...)."""
    groups: GroupResolver = NO_GROUPS
    """This rank's process groups by kind ("tp", "dp", "pp"): c10d names and ranks for passes that lower
    collectives (graphllm.parallel.groups.ParallelState; NO_GROUPS in a single process)."""
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    """The plan's recomputation policy (applied when the joint graph is partitioned)."""
    backend: str = "eager"
    """The backend that compiles the graphs (its lowering table is already bound to `lower_ops`)."""
    amp: Literal["fp32", "bf16"] = "fp32"
    """fp32, or bf16 autocast around the compiled graphs."""
    logger: logging.Logger = logger
    """Where passes log what they did."""
    stage: Stage = "model"
    """Which stage is running."""
    graph_kind: Literal["model", "forward", "backward", "inference"] = "model"
    """For `train` passes: which aot_autograd graph this is."""
    counters: dict[str, Counter] = field(default_factory=dict)
    """Per-pass counters, filled through `count`."""
    current_pass: str = ""

    @property
    def world_size(self) -> int:
        """Number of ranks of the layout."""
        return self.layout.world_size

    def for_graph(self, graph_kind: str) -> "PassContext":
        """A context for the train passes of one aot graph: the same plan, fresh counters."""
        return PassContext(layout=self.layout, rank=self.rank, config=self.config, groups=self.groups,
                           recompute=self.recompute, backend=self.backend, amp=self.amp, logger=self.logger,
                           stage="train", graph_kind=graph_kind)

    def count(self, key: str, n: int = 1) -> None:
        """Add n to this pass's counter `key` (shown in the report and by `graphllm inspect`)."""
        self.counters.setdefault(self.current_pass, Counter())[key] += n


@dataclass(frozen=True, slots=True)
class GraphPass:
    """A named graph rewrite with its bound options and ordering constraints."""

    name: str
    stage: Stage
    fn: Callable[..., fx.GraphModule]
    options: Mapping[str, Any] = field(default_factory=dict)
    after: tuple[str, ...] = ()
    """Passes that must run before this one when both are in the pipeline."""
    before: tuple[str, ...] = ()
    """Passes that must run after this one when both are in the pipeline."""
    changes_numerics: bool = False
    """Opt-in tier: True for passes that may change results beyond reduction-order rounding."""

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        return self.fn(gm, ctx, **self.options)

    def with_options(self, **options: Any) -> "GraphPass":
        return replace(self, options={**self.options, **options})

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "stage": self.stage, "options": jsonable(self.options),
                "changes_numerics": self.changes_numerics}


def graph_pass(
    name: str,
    *,
    stage: Stage = "model",
    after: Iterable[str] = (),
    before: Iterable[str] = (),
    changes_numerics: bool = False,
) -> Callable[[Callable[..., fx.GraphModule]], GraphPass]:
    """Decorator that turns `fn(gm, ctx, **options) -> GraphModule` into a GraphPass."""
    if stage not in ("model", "train"):
        raise GraphllmError(f"graph_pass {name!r}: stage must be 'model' or 'train', got {stage!r}")

    def wrap(fn: Callable[..., fx.GraphModule]) -> GraphPass:
        return GraphPass(name=name, stage=stage, fn=fn, after=tuple(after), before=tuple(before),
                         changes_numerics=changes_numerics)

    return wrap


def order_passes(passes: Sequence[GraphPass], *, disable: Iterable[str] = ()) -> list[GraphPass]:
    """Drop disabled passes, then order the rest: list order, moved only as constraints demand."""
    disable = set(disable)
    names = [p.name for p in passes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise GraphllmError(f"pass names must be unique in a pipeline; repeated: {', '.join(dupes)}")
    unknown = disable - set(names)
    if unknown:
        raise GraphllmError(
            f"--disable names unknown pass(es) {', '.join(sorted(unknown))}; passes here: {', '.join(names)}")
    kept = [p for p in passes if p.name not in disable]
    present = {p.name for p in kept}
    deps: dict[str, set[str]] = {p.name: {a for a in p.after if a in present} for p in kept}
    for p in kept:
        for b in p.before:
            if b in present:
                deps[b].add(p.name)
    ordered: list[GraphPass] = []
    done: set[str] = set()
    pending = list(kept)
    while pending:
        # the first pending pass whose prerequisites are done keeps the list order stable
        nxt = next((p for p in pending if deps[p.name] <= done), None)
        if nxt is None:
            raise GraphllmError("pass ordering constraints form a cycle among: "
                                + ", ".join(p.name for p in pending))
        ordered.append(nxt)
        done.add(nxt.name)
        pending.remove(nxt)
    return ordered


@dataclass(kw_only=True, slots=True)
class PassRecord:
    """What one pass did to one graph."""

    name: str
    graph_kind: str
    nodes_before: int
    nodes_after: int
    added: int
    removed: int
    seconds: float
    counters: dict[str, int]

    @property
    def changed(self) -> bool:
        return self.added > 0 or self.removed > 0


DumpFn = Callable[[fx.GraphModule, str], None]


def run_passes(
    gm: fx.GraphModule,
    passes: Sequence[GraphPass],
    ctx: PassContext,
    *,
    dump: DumpFn | None = None,
) -> tuple[fx.GraphModule, list[PassRecord]]:
    """Run `passes` in order with the runner's checks; returns the final graph and one record a pass.

    Checks after each pass: it returned a GraphModule, the graph lints, and the code recompiles.
    Nodes a pass created are stamped with meta[PASS_META_KEY] = its name (provenance for dumps).
    """
    records: list[PassRecord] = []
    ran: list[str] = []
    for p in passes:
        if p.stage != ctx.stage:
            raise PassError(f"pass {p.name!r} is a {p.stage!r} pass but was given to the {ctx.stage!r} stage")
        before_nodes = set(gm.graph.nodes)
        ctx.current_pass = p.name
        t0 = time.perf_counter()
        where = f"(passes before it: {', '.join(ran) or 'none'})"
        origin = getattr(p.fn, "__module__", None)
        try:
            out = p(gm, ctx)
        except (GraphllmError, PassError):
            raise
        except Exception as e:  # a bug in a pass: name it (and where, for a user pass), keep the cause chained
            raise PassError(f"pass {p.name!r} failed on the {ctx.graph_kind} graph {where}: {type(e).__name__}: {e}",
                            origin=origin, user_code=_user_code(p, e.__traceback__)) from e
        if not isinstance(out, fx.GraphModule):
            raise PassError(f"pass {p.name!r} returned {type(out).__name__}, not a GraphModule {where}",
                            origin=origin, user_code=_user_code(p, None))
        try:
            out.graph.lint()
            out.recompile()
        except Exception as e:
            raise PassError(f"pass {p.name!r} left an invalid graph {where}: {e}", origin=origin,
                            user_code=_user_code(p, None)) from e
        after_nodes = set(out.graph.nodes)
        added = [n for n in out.graph.nodes if n not in before_nodes]
        for n in added:
            n.meta.setdefault(PASS_META_KEY, p.name)
        rec = PassRecord(
            name=p.name, graph_kind=ctx.graph_kind, nodes_before=len(before_nodes),
            nodes_after=len(after_nodes), added=len(added), removed=len(before_nodes - after_nodes),
            seconds=time.perf_counter() - t0, counters=dict(ctx.counters.get(p.name, {})),
        )
        records.append(rec)
        ran.append(p.name)
        gm = out
        if dump is not None:
            dump(gm, p.name)
    ctx.current_pass = ""
    return gm, records


def jsonable(value: Any) -> Any:
    """Plain JSON data for pass options (anything else as its repr)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return repr(value)
