"""Stopping a run between steps: SIGTERM/SIGINT set a flag the training loop checks after each step.

What `kill PID`, `docker stop`, Kubernetes and systemd send is SIGTERM; Ctrl-C is SIGINT. The loop
finishes the step it is in, saves it (with --save) and exits 128 + the signal number.
"""

from __future__ import annotations

import signal
import threading

import torch


class StopSignals:
    """SIGTERM/SIGINT while training: the first sets a flag that the loop checks between steps (so the
    final checkpoint holds a whole step), a second interrupts at once (KeyboardInterrupt, nothing saved).
    Handlers are installed only in the main thread and restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def requested(self) -> int | None:
        """The signal number to stop for, agreed by every rank (the highest any rank received), or None."""
        import torch.distributed as dist

        got = self.received or 0
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([got], dtype=torch.int64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            got = int(t[0])
        return got or None
