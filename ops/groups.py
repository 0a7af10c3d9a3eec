"""How graphllm's collective ops find their process groups: a resolver the parallel runtime installs.

Graphs name a group by its kind only ("tp", "dp", "pp"), so the same plan gives the same graph on every
run. At run time an op asks the installed resolver for this rank's group of that kind. The runtime
(graphllm.parallel.groups.init_parallel) installs its ParallelState; nothing here imports the runtime,
so ops stay below it. A process that never set up groups gets one clear error from `resolver()`.
"""

from __future__ import annotations

from typing import Any, Protocol

from graphllm.errors import GraphllmError


class GroupResolver(Protocol):
    """This rank's process groups by kind."""

    def name(self, kind: str) -> str:
        """The c10d name of the group (what `_c10d_functional` ops take)."""
        ...

    def local_rank(self, kind: str) -> int:
        """This rank's index inside the group."""
        ...

    def process_group(self, kind: str) -> Any:
        """The torch.distributed ProcessGroup."""
        ...


class NoGroups:
    """The resolver of a process without process groups: any question is the user's error."""

    def _refuse(self, kind: str):
        raise GraphllmError(f"a graph with {kind} collectives ran in a process without a {kind} group; "
                            "run it through `graphllm run` (it starts the ranks) or call init_parallel first")

    def name(self, kind: str) -> str:
        return self._refuse(kind)

    def local_rank(self, kind: str) -> int:
        return self._refuse(kind)

    def process_group(self, kind: str) -> Any:
        return self._refuse(kind)


NO_GROUPS = NoGroups()
_installed: GroupResolver = NO_GROUPS


def install(resolver: GroupResolver | None) -> None:
    """Make `resolver` answer the ops' group questions in this process (None: no groups)."""
    global _installed
    _installed = resolver if resolver is not None else NO_GROUPS


def resolver() -> GroupResolver:
    """The installed resolver (NO_GROUPS when the runtime set none up)."""
    return _installed
