"""Per-layer time for `graphllm profile --by-layer`: self time summed inside the profiler ranges that the
`layer_markers` train pass (passes/layer_markers.py) puts around each layer's graph nodes.

The pass wraps every run of consecutive forward/backward graph nodes that belong
to one module (`model.layers.3`, `model.embed_tokens`, `lm_head`; read from the node's
`nn_module_stack`, or for backward nodes from the forward node they differentiate) in a profiler range
named `graphllm.region/<forward|backward>/<module>`. `by_layer` then sums the self time of every op
inside each range.

The ranges are record_function calls in the graph, which the eager backend executes and inductor
drops (its kernels fuse across the boundaries anyway), so `--by-layer` profiles the artifact's graphs on
the eager backend: the same passes and graphs, each op its own kernel. Shares between layers carry
over; absolute times are those of unfused kernels.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from graphllm.passes.layer_markers import LAYER, REGION_PREFIX

def by_layer(events) -> dict[str, dict[str, float]]:
    """{module: {"forward": s, "backward": s}} of op self time inside each region (outermost region wins)."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"forward": 0.0, "backward": 0.0})
    for e in events:
        if e.name.startswith(REGION_PREFIX):
            continue
        region, parent = None, e.cpu_parent
        while parent is not None:
            if parent.name.startswith(REGION_PREFIX):
                region = parent.name
            parent = parent.cpu_parent
        if region is None:
            continue
        phase, _, module = region[len(REGION_PREFIX):].partition("/")
        out[module][phase if phase in ("forward", "backward") else "forward"] += e.self_cpu_time_total / 1e6
    return dict(sorted(out.items(), key=lambda kv: _order(kv[0])))


def _order(module: str) -> tuple[int, Any]:
    m = LAYER.search(module)
    if "embed" in module:
        return (0, 0)
    if m:
        return (1, int(m.group(1)))
    return (2, module)
