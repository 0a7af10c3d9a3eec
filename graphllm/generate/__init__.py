"""Generation on compiled static graphs: a prefill graph per prompt bucket and one decode graph over a
preallocated KV cache (docs/inference.md)."""

from graphllm.generate.engine import GenerationStats, StaticGenerator, bucket
from graphllm.generate.sampling import Sampler, SamplingConfig
from graphllm.generate.stream import TextStream
from graphllm.generate.text import Completion, eos_ids_of, generate_text, generate_until

__all__ = ["Completion", "GenerationStats", "Sampler", "SamplingConfig", "StaticGenerator", "TextStream", "bucket",
           "eos_ids_of", "generate_text", "generate_until"]
