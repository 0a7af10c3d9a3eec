"""`python -m graphllm ...` is the `graphllm` command (torchrun launches it this way)."""

from graphllm.cli.main import entry

entry()
