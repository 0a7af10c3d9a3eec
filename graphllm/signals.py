"""Stopping on SIGTERM/SIGINT: between steps while training, at once before and after it.

What `kill PID`, `docker stop`, Kubernetes and systemd send is SIGTERM; Ctrl-C is SIGINT. While
training (StopSignals), the first one lets the loop finish the step it is in, save it (with --save) and
exit 128 + the signal number; a second one stops at once. Outside training (`StopAtOnce`, installed by
the CLI around every command) a signal stops at once. "At once" is `StoppedBySignal`, a BaseException
the CLI turns into one line and exit code 128 + the signal number, also when what reaches it is an
error raised in its wake (`stopped_at_once`).
"""

from __future__ import annotations

import signal
import threading

import torch

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StoppedBySignal(BaseException):
    """A stop signal that did not wait for the end of a step. A BaseException, like KeyboardInterrupt, so
    that `except Exception` in training code (save-on-failure) does not treat it as a failing step."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(signum, message)  # args = the constructor's: picklable (DCP gathers failures across ranks)
        self.signum, self.message = int(signum), message

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return self.message


_RAISED: list[StoppedBySignal] = []


def stopped_at_once() -> StoppedBySignal | None:
    """The StoppedBySignal a handler here raised in this process, if any. Whatever exception reaches the
    top after it is its consequence, even one that does not chain to it: a library's cleanup that failed
    in its wake (torch.save's zip writer), or DCP's CheckpointException, whose per-rank failures crossed
    ranks pickled, without their cause and context."""
    return _RAISED[0] if _RAISED else None


def _stop_now(signum: int, message: str) -> StoppedBySignal:
    stop = StoppedBySignal(signum, message)
    _RAISED.append(stop)
    return stop


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class StopAtOnce:
    """Around a whole command (the CLI installs it): SIGTERM/SIGINT raise StoppedBySignal at once, with
    "stopped by SIGTERM" + `before` (e.g. "before training started; nothing was saved"). Once a training
    loop (StopSignals) has run inside it, `after` replaces `before`. Main thread only; restored on exit."""

    def __init__(self, before: str = "", after: str = "") -> None:
        self.before, self.after = before, after
        self.trained = False
        self._old: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        detail = self.after if self.trained else self.before
        raise _stop_now(signum, f"stopped by {signal_name(signum)}{' ' + detail if detail else ''}")

    def __enter__(self) -> "StopAtOnce":
        _RAISED.clear()  # a new command (the CLI called in-process again): nothing raised in it yet
        if _in_main_thread():
            for sig in SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class StopSignals:
    """SIGTERM/SIGINT while training: the first sets a flag that the loop checks between steps (so the
    final checkpoint holds a whole step), a second raises StoppedBySignal at once (the final checkpoint
    is not written). Handlers are installed only in the main thread and restored on exit."""

    SIGNALS = SIGNALS

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise _stop_now(signum, f"stopped at once by a second {signal_name(signum)} (the first was "
                                    f"{signal_name(self.received)}): the final checkpoint was not written")
        self.received = signum

    def __enter__(self) -> "StopSignals":
        if _in_main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        for old in self._old.values():
            outer = getattr(old, "__self__", None)
            if isinstance(outer, StopAtOnce):
                outer.trained = True  # a signal after this loop is not "before training started"
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
