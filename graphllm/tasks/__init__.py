"""Training objectives beyond next-token cross-entropy (graphllm.planning.task_config): what the compiled
training step computes from a batch for DPO, SimPO, outcome and process reward models."""
