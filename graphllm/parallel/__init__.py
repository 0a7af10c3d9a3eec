"""The parallel runtime: process groups, the step engine, the pipeline runner, the ZeRO-1 optimizer and
sharded checkpoints. What a plan *means* (layout arithmetic, shards, FLOPs and bytes) is in
graphllm.planning; this package only runs it."""
