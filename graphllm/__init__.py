"""graphllm: graph-mode LLM training — capture to torch.fx, a visible pass pipeline, compile, run.

The public API: `load_model`, `compile` (one model graph), `CompilePlan` + `compile_artifact` (what
`graphllm compile` does), `Trainer` + `RunConfig` / `TrainConfig` (what `graphllm run` does), the pass
API (`graph_pass`, `PassContext`, `default_passes`) and `build_pipeline` (the steps of a plan).
"""

from graphllm.version import __version__  # noqa: E402
from graphllm.errors import GraphllmError  # noqa: E402
from graphllm.compile import CompiledModel, compile  # noqa: E402
from graphllm.job import compile_artifact, load_artifact  # noqa: E402
from graphllm.models import load_model  # noqa: E402
from graphllm.pass_pipeline import Pipeline, build_pipeline  # noqa: E402
from graphllm.passes import PassContext, default_passes, graph_pass  # noqa: E402
from graphllm.plan import CompilePlan  # noqa: E402
from graphllm.planning import Layout  # noqa: E402
from graphllm.planning.recompute_config import RecomputeConfig  # noqa: E402
from graphllm.run_config import RunConfig  # noqa: E402
from graphllm.signals import StoppedBySignal  # noqa: E402
from graphllm.train import TrainConfig  # noqa: E402
from graphllm.trainer import Trainer, TrainResult  # noqa: E402

__all__ = ["CompilePlan", "CompiledModel", "GraphllmError", "Layout", "PassContext", "Pipeline", "RecomputeConfig",
           "RunConfig", "StoppedBySignal", "TrainConfig", "TrainResult", "Trainer", "__version__", "build_pipeline", "compile",
           "compile_artifact", "default_passes", "graph_pass", "load_artifact", "load_model"]
