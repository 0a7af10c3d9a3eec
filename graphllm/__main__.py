"""`python -m graphllm ...` is the `graphllm` command (torchrun launches it this way)."""

import sys

from graphllm.cli.main import main

sys.exit(main())
