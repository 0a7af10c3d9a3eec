"""The planner behind `graphllm plan`: predict a plan's per-rank memory and step time from graphllm's own
graphs (captured on fake tensors: no weights are allocated), and search the layouts of a cluster.

- `graphllm.planner.predict`: `predict(plan, device) -> Prediction`, the stable API (helper benchmarks compare
  it with measured runs).
- `graphllm.planner.devices`: the device table (peak FLOP/s, HBM and link bandwidths, memory), and the
  on-the-spot probe for `cpu`.
- `graphllm.planner.measure`: the per-layer graph measurements (FLOPs, saved activations, collectives),
  cached per (tp, sp, cp, recompute, micro-batch) combination; `graphllm.planner.node_costs` the per-node rules.
- `graphllm.planner.memory`: a rank's memory over the phases of a step (the peak is the largest phase).
- `graphllm.planner.search`: the enumeration of tp × pp × vpp × dp × cp × micro-batch × recompute × ZeRO-1.
- `graphllm.planner.models`: config-only presets (llama2-70b, llama2-7b) for `graphllm plan --model`.
"""

from graphllm.planner.predict import MemoryOptions, Prediction, predict

__all__ = ["MemoryOptions", "Prediction", "predict"]
