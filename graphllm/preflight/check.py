"""Every op of a compiled graph against torchair: can GE convert it, and can ACL-graph mode capture it.

torchair turns each FX node into Ascend GE IR through the GE converter registered for its op overload
(graphllm.preflight.converters indexes them from the torch_npu wheel's sources). A node is:

- `fused kernel`  a torch_npu kernel (`npu.*`) with a GE converter;
- `converter`     an ATen/collective op whose converter is implemented;
- `conditional`   a converter that raises NotImplementedError on some inputs, whose conditions graphllm does
                  not evaluate (they are listed): it may work;
- `unsupported inputs` a converter whose written conditions (graphllm.preflight.conditions evaluates them on
                  the node's arguments and shapes, for an A2/A3 device) refuse this node;
- `builtin`       Python operators on sizes (`operator.getitem`, `sym_size`), which torchair handles itself;
- `stub`          a registered converter that only raises NotImplementedError: GE graph build fails;
- `no converter`  nothing registered: GE graph build fails (torchair can auto-generate converters only for
                  custom ops whose name matches an Ascend IR, never for ATen ops or graphllm's own);
- `not capturable` an RNG or host-synchronising op in a graph that ACL-graph capture (npugraph_ex,
                  `--npu-mode reduce-overhead`) records: the generation decode graph always, training graphs
                  under reduce-overhead.

`stub`, `no converter`, `unsupported inputs` and `not capturable` block: `graphllm compile --dry-run` exits 2 on the first of them, naming the op, the pass
that created it and its source line.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.fx as fx

from graphllm.dump import node_rows
from graphllm.errors import GraphllmError
from graphllm.preflight.conditions import UNKNOWN, refusal
from graphllm.preflight.converters import Converter, lookup

FUSED, CONVERTER, CONDITIONAL, BUILTIN = "fused kernel", "converter", "conditional", "builtin"
STUB, MISSING, NOT_CAPTURABLE = "stub", "no converter", "not capturable"
REFUSED = "unsupported inputs"
BLOCKING = (STUB, MISSING, REFUSED, NOT_CAPTURABLE)
STATUS_ORDER = (NOT_CAPTURABLE, MISSING, STUB, REFUSED, CONDITIONAL, FUSED, CONVERTER, BUILTIN)
"""Display order: what blocks first, then what might, then what works."""

RNG_OPS = frozenset({
    "rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "randperm", "bernoulli", "bernoulli_",
    "native_dropout", "dropout", "normal", "normal_", "uniform", "uniform_", "multinomial", "exponential",
    "exponential_", "poisson", "geometric_", "cauchy_", "log_normal_", "random_", "philox_rand",
    "run_and_save_rng_state", "run_with_rng_state", "npu_dropout_gen_mask",
})
"""Op names (any namespace and overload) that draw random numbers: ACL-graph capture replays recorded
kernels, so a captured RNG op repeats the same numbers every replay."""
HOST_SYNC_OPS = frozenset({
    "_local_scalar_dense", "item", "nonzero", "nonzero_static", "masked_select", "unique", "_unique2",
    "unique_consecutive", "unique_dim", "is_nonzero", "equal", "_assert_scalar", "allclose", "tolist",
})
"""Op names whose output size or value the host must read back mid-graph: capture cannot record them."""
BUILTIN_OPS = frozenset({"sym_size", "sym_numel", "sym_stride", "sym_storage_offset"})


@dataclass(frozen=True, slots=True)
class OpStatus:
    """One distinct op of one graph."""

    op: str
    status: str
    count: int
    detail: str = ""
    made_by: str = ""
    """The pass that created the op's first node (`capture`: the model's own code; `aot_autograd`: the backward)."""
    source: str = ""
    """The model source line of its first node (the dump's provenance)."""

    @property
    def blocking(self) -> bool:
        return self.status in BLOCKING


@dataclass(slots=True)
class GraphCheck:
    """The ops of one compiled graph on one rank."""

    rank: int
    graph: str
    capture: bool
    ops: list[OpStatus] = field(default_factory=list)

    @property
    def blocking(self) -> list[OpStatus]:
        return [o for o in self.ops if o.blocking]

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "graph": self.graph, "capture": self.capture,
                "ops": [asdict(o) for o in self.ops]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "GraphCheck":
        return cls(rank=data["rank"], graph=data["graph"], capture=data["capture"],
                   ops=[OpStatus(**o) for o in data["ops"]])


def _op_name(target: Any) -> str:
    """`aten.add.Tensor`, `npu.npu_rms_norm.default`, `operator.getitem`, ... (as the graph dumps print it)."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order.{target.name()}"
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__name__', repr(target))}".lstrip(".")


def _base_name(op: str) -> str:
    """The op's name without namespace and overload: `aten.bernoulli_.float` -> `bernoulli_`."""
    parts = op.split(".")
    return parts[1] if len(parts) >= 3 else parts[-1]


def _input_dtypes(node: fx.Node) -> set[str]:
    found = set()
    for arg in node.all_input_nodes:
        val = arg.meta.get("val")
        if isinstance(val, torch.Tensor):
            found.add(str(val.dtype).removeprefix("torch."))
    return found


def classify(node: fx.Node, index: Mapping[str, Converter], *, capture: bool) -> tuple[str, str]:
    """(status, detail) of one call_function node."""
    op = _op_name(node.target)
    name = _base_name(op)
    if capture and name in RNG_OPS:
        return NOT_CAPTURABLE, "draws random numbers: ACL-graph capture is checked without RNG ops (docs/ascend.md)"
    if capture and name in HOST_SYNC_OPS:
        return NOT_CAPTURABLE, "reads a value back to the host mid-graph: ACL-graph capture cannot record it"
    if not isinstance(node.target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)) or name in BUILTIN_OPS:
        return BUILTIN, ""  # operator.getitem and other Python callables, size queries
    conv = lookup(index, op)
    if conv is None:
        if op.startswith("graphllm."):
            return MISSING, "a graphllm op the npu lowering left in place (no torch_npu kernel or decomposition)"
        return MISSING, "no GE converter registered in torchair"
    if conv.status == "stub":
        return STUB, f"its GE converter only raises NotImplementedError ({conv.where})"
    works = FUSED if op.startswith("npu.") else CONVERTER
    if conv.status == "partial":
        refused = refusal(op, node, conv)
        if refused is UNKNOWN:
            conds = "; ".join(conv.unsupported) or "some inputs"
            return CONDITIONAL, f"unsupported when: {conds} ({conv.where})"
        if refused:
            return REFUSED, f"{refused} ({conv.where})"
        return works, "its converter's conditions hold here"
    outside = sorted(_input_dtypes(node) - set(conv.dtypes)) if conv.dtypes else []
    if outside:  # declare_supported lists torchair's test cases, not a restriction: noted, not flagged
        return works, f"input dtype {', '.join(outside)} is not among torchair's declared test cases"
    return works, ""


def check_graph(gm: fx.GraphModule, index: Mapping[str, Converter], *, rank: int, graph: str,
                capture: bool, origins: Mapping[str, tuple[str, str]] | None = None) -> GraphCheck:
    """Classify every call of `gm`. `origins`: op -> (pass, source) from the model graph before
    partitioning, for ops whose nodes in `gm` lost that provenance (aot_autograd retraces)."""
    rows = {r["name"]: r for r in node_rows(gm, default_pass="aot_autograd")}
    counts: Counter[str] = Counter()
    first: dict[str, tuple[str, str, str, str]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        op = _op_name(node.target)
        counts[op] += 1
        if op not in first:
            status, detail = classify(node, index, capture=capture)
            row = rows[node.name]
            made_by, source = row["pass"], row["source"]
            if origins and op in origins and made_by in ("aot_autograd", "capture", ""):
                made_by, source = origins[op][0], source or origins[op][1]
            first[op] = (status, detail, made_by, source)
    ops = [OpStatus(op=op, status=s, count=counts[op], detail=d, made_by=m, source=src)
           for op, (s, d, m, src) in first.items()]
    ops.sort(key=lambda o: (STATUS_ORDER.index(o.status), o.op))
    return GraphCheck(rank=rank, graph=graph, capture=capture, ops=ops)


def model_origins(gm: fx.GraphModule) -> dict[str, tuple[str, str]]:
    """op -> (pass that created it, source line) over the lowered model graph, preferring a pass over
    `capture` (the op a user pass inserted is attributed to that pass, not to the model)."""
    out: dict[str, tuple[str, str]] = {}
    for row, node in zip(node_rows(gm), gm.graph.nodes):
        if node.op != "call_function":
            continue
        op = _op_name(node.target)
        if op not in out or (out[op][0] == "capture" and row["pass"] != "capture"):
            out[op] = (row["pass"], row["source"])
    return out


def first_blocking(checks: list[GraphCheck]) -> tuple[GraphCheck, OpStatus] | None:
    for c in checks:
        for o in c.blocking:
            return c, o
    return None


def blocking_line(check: GraphCheck, op: OpStatus, wheel: str) -> str:
    """The one line `graphllm compile --dry-run` exits with."""
    where = f", made by pass {op.made_by}" if op.made_by else ""
    where += f" at {op.source}" if op.source else ""
    return (f"npu pre-flight ({wheel}): rank {check.rank} {check.graph} graph: {op.op} ({op.status}: {op.detail})"
            f"{where}; change the lowering or the pass so that it emits ops torchair converts "
            f"(`graphllm inspect ART --npu-coverage` lists every op)")


def worst_statuses(checks: list[GraphCheck]) -> dict[str, str]:
    """op -> its most blocking status over all `checks` (STATUS_ORDER)."""
    status: dict[str, str] = {}
    for c in checks:
        for o in c.ops:
            prev = status.get(o.op)
            if prev is None or STATUS_ORDER.index(o.status) < STATUS_ORDER.index(prev):
                status[o.op] = o.status
    return status


def coverage_counts(checks: list[GraphCheck]) -> dict[str, int]:
    """Distinct ops over all graphs, per status."""
    return dict(Counter(worst_statuses(checks).values()))


def guarded(compile_fn: Callable, *, index: Mapping[str, Converter], wheel: str, rank: int, capture: bool,
            graph_name: Callable[[], str]) -> Callable:
    """`compile_fn` (torchair's compiler of one partitioned graph) that first checks the graph and refuses one
    with a blocking op in one line, instead of GE failing on it mid-build (the npu backend on an Ascend machine)."""
    def compile_one(gm: fx.GraphModule, example_inputs: list) -> Callable:
        found = first_blocking([check_graph(gm, index, rank=rank, graph=graph_name(), capture=capture)])
        if found is not None:
            raise GraphllmError(blocking_line(*found, wheel))
        return compile_fn(gm, example_inputs)
    return compile_one
