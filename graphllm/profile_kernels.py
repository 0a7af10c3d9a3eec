"""Inductor's fused kernels in `graphllm profile`, attributed to the graphllm passes whose nodes they compute.

Inductor keeps, for every kernel it generates, the FX nodes the kernel computes (its "origins"). The
profile compiles an inductor artifact with two of inductor's options on (`kernel_profiling()`):
`cpp.enable_kernel_profile`, so each C++ kernel opens a profiler range under its own name, and
`descriptive_names="inductor_node"` (cpp and triton), so that name lists the kernel's origin nodes:
`graph_0_cpp_fused_add_10_mean_3_pow_4_rsqrt_3_mul_16_5` is kernel 5 of a graph, fusing add_10, mean_3,
pow_4, rsqrt_3 and mul_16 of the forward or backward graph that graphllm's train stage handed to inductor
(`train_stage.graphs`; whether it ran in the forward or the backward the profile says by the
`CompiledFunctionBackward` range around it). The kernels' code is the same; only their names and the
ranges differ from those of `graphllm compile`, so inductor's cache holds the profiled build apart.

Each origin node is traced back to the pass that created it (`node_passes`):
- a node a train pass created carries the pass's stamp (`graphllm_pass`);
- a node traced inside a lowered graphllm op (Dynamo inlines the op's decomposition) has a stack trace
  whose frame in the lowered model graph's code reads `rope_default_2 = graphllm_ops_rope_rope_decomposed(...)`:
  the model graph's node of that name carries the pass that created the op (fuse_rope); backward nodes
  carry the stack trace of the forward node they differentiate;
- any other node is an ATen op the lowered graph calls directly; it counts by op name like an unfused
  op (`by_op`: capture, or the pass whose model-graph nodes call that op).
A kernel's time is shared among those passes in proportion to its origin nodes. Names that match no
node (helpers inductor's own passes add) are left out of the shares; a kernel none of whose names
matches counts as "inductor (unattributed)".
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter, defaultdict
from typing import Any, Callable, Iterator

import torch.fx as fx

from graphllm.passes.manager import PASS_META_KEY

KERNEL = re.compile(r"^(?:graph_\d+_)?(?:cpp|triton_[a-z]+)_fused_(?P<nodes>.+)_\d+$")
"""A generated kernel's name: optional `graph_<id>_` (cpp kernel ranges), kind, `fused_`, names, a counter."""
UNATTRIBUTED = "inductor (unattributed)"
MAX_NAME_TOKENS = 24
"""Longest node name, in `_`-separated tokens, looked for in a kernel name
(`_scaled_dot_product_flash_attention_for_cpu_backward_3` has 10)."""
_GM_FRAME = re.compile(r'File "<eval_with_key>\.\d+", line \d+, in \w+\n\s+(\w+) = ')
"""A stack-trace frame in a GraphModule's generated code; the group is the node the line assigns."""
_OPTIONS = {"cpp.enable_kernel_profile": True, "cpp.descriptive_names": "inductor_node",
            "triton.descriptive_names": "inductor_node"}


@contextlib.contextmanager
def kernel_profiling() -> Iterator[None]:
    """Inductor compiles inside this with a profiler range per kernel, named after the kernel's origin nodes."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(_OPTIONS):
        yield


def kernel_names_active() -> bool:
    """Whether kernels compiled now are named after their origin nodes (inside `kernel_profiling`)."""
    import torch._inductor.config as inductor_config

    return inductor_config.cpp.descriptive_names == "inductor_node"


def graph_kind(name: str) -> str:
    """A train-stage graph's name (`backward`, `forward_1`, `stage1/backward`) → forward | backward | inference."""
    return re.sub(r"_\d+$", "", name.rsplit("/", 1)[-1])


def traced_pass(node: fx.Node, model_passes: dict[str, str]) -> str | None:
    """The pass that created a forward/backward graph node, where the node says: its stamp, or the
    lowered model graph's node whose code line it was traced from. None for a directly called op."""
    if PASS_META_KEY in node.meta:
        return node.meta[PASS_META_KEY]
    m = _GM_FRAME.search(node.meta.get("stack_trace") or "")
    return model_passes.get(m.group(1)) if m else None


def model_passes(built) -> dict[str, str]:
    """Model graph node name → the pass that created it ("capture" for the captured nodes)."""
    out: dict[str, str] = {}
    for gm in (built.result.model_graph, getattr(built.result, "lowered_graph", None)):
        for n in gm.graph.nodes if gm is not None else ():
            out.setdefault(n.name, n.meta.get(PASS_META_KEY, "capture"))
    return out


def node_passes(built, by_op: Callable[[Any], str]) -> dict[str, dict[str, str]]:
    """Graph kind → {node name → pass} over the train stage's forward/backward graphs (module docstring)."""
    named = model_passes(built)
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for name, gm in built.result.train_stage.graphs.items():
        nodes = out[graph_kind(name)]
        for n in gm.graph.nodes:
            if n.op == "call_function":
                nodes[n.name] = traced_pass(n, named) or by_op(n.target)
    return dict(out)


def split_names(text: str, known: set[str] | dict[str, Any]) -> list[str]:
    """The known node names a kernel name's middle part is made of, joined by `_` (`add_10_mean_3` →
    [add_10, mean_3]). Names are found by the split that covers the most tokens; unknown tokens are skipped."""
    parts = text.split("_")
    best: list[tuple[int, list[str]]] = [(0, [])]  # best[i]: (tokens covered, names) for parts[:i]
    for i in range(1, len(parts) + 1):
        options = [(best[i - 1][0], best[i - 1][1])]  # parts[i-1] skipped
        for j in range(max(0, i - MAX_NAME_TOKENS), i):
            name = "_".join(parts[j:i])
            if name in known:
                options.append((best[j][0] + i - j, best[j][1] + [name]))
        best.append(max(options, key=lambda o: (o[0], -len(o[1]))))
    return best[-1][1]


class KernelOrigins:
    """Shares of a kernel's time per pass, from its name and whether it ran in the backward."""

    def __init__(self, passes: dict[str, dict[str, str]]) -> None:
        self.passes = passes
        self.seen: dict[tuple[str, str], dict[str, int]] = {}
        """(graph kind, kernel) → origin nodes per pass, for every kernel asked about (the summary lists them)."""

    def shares(self, kernel: str, kind: str) -> dict[str, float] | None:
        """{pass: fraction of the kernel's time}; None when `kernel` is not a generated kernel's name."""
        m = KERNEL.match(kernel)
        if m is None:
            return None
        key = (kind, kernel)
        if key not in self.seen:
            nodes = self.passes.get(kind, {})
            self.seen[key] = dict(Counter(nodes[n] for n in split_names(m.group("nodes"), nodes)))
        counts = self.seen[key]
        total = sum(counts.values())
        return {p: c / total for p, c in counts.items()} if total else {UNATTRIBUTED: 1.0}

    def listing(self) -> dict[str, dict[str, int]]:
        """`kind:kernel` → origin nodes per pass, for the JSON summary."""
        return {f"{kind}:{kernel}": counts for (kind, kernel), counts in sorted(self.seen.items())}
