"""Planning: pure arithmetic about a plan, computed from configs and graphs, with no process state.

The parallel layout and its checks (`layout`), how a parameter is sliced over a group (`sharding`),
FLOPs (`flops`), bytes saved for the backward and bytes communicated (`memory`, `comm`), and the typed
recomputation policy (`recompute_config`). Passes use these; so do the report, the runtime and the
planner. Nothing here imports a pass, a runtime module or torch.distributed.
"""

from graphllm.planning.layout import Coords, Layout
from graphllm.planning.sharding import ParamShard, set_shard, shard_of, shard_param

__all__ = ["Coords", "Layout", "ParamShard", "set_shard", "shard_of", "shard_param"]
