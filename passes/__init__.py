"""graphllm.passes: the pass API (`graph_pass`, `PassContext`), the runner, and the passes."""

from graphllm.passes.manager import GraphPass, PassContext, PassError, PassRecord, graph_pass, order_passes, run_passes
from graphllm.passes.pipeline import default_passes

__all__ = ["GraphPass", "PassContext", "PassError", "PassRecord", "default_passes", "graph_pass", "order_passes",
           "run_passes"]
