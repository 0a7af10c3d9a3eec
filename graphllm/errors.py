"""The one error type users see.

This module is a leaf: every layer (models/, ops/, passes/, graphllm/) may import it. The CLI turns a
GraphllmError into one line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""


class GraphllmError(ValueError):
    """A problem with the user's input (flag, file, config, checkpoint); the message names it and the fix."""


def exception_chain(exc: BaseException):
    """`exc` and everything it wraps, each once: its cause and context, torch Dynamo's `inner_exception`
    (an error inside a backend compiler, where train passes run) and torch.distributed.checkpoint's
    per-rank `failures` (DCP re-raises every rank's exception as one CheckpointException)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, getattr(e, "inner_exception", None)]
        failures = getattr(e, "failures", None)  # {rank: exception} or {rank: (exception, traceback summary)}
        if isinstance(failures, dict):
            for f in failures.values():
                f = f[0] if isinstance(f, tuple) and f else f
                if isinstance(f, BaseException):
                    todo.append(f)
