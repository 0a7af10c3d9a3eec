"""graphllm: graph-mode LLM training — capture to torch.fx, a visible pass pipeline, compile, run."""

__version__ = "0.1.0"

from graphllm.errors import GraphllmError  # noqa: E402
from graphllm.compile import CompiledModel, compile  # noqa: E402
from graphllm.models import load_model  # noqa: E402
from graphllm.passes import default_passes, graph_pass, PassContext  # noqa: E402

__all__ = ["CompiledModel", "GraphllmError", "PassContext", "__version__", "compile", "default_passes",
           "graph_pass", "load_model"]
