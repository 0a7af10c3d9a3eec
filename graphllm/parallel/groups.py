"""Process groups, built once per process from the layout, and looked up by kind ("tp", "dp", "pp", "cp", ...).

Graphs name groups by kind only (`graphllm::tp_reduce(x, "tp")`), never by a runtime handle, so the
same graph (and its hash) comes out on every run; the kind resolves to this rank's ProcessGroup here.
`init_parallel` installs the ParallelState as the ops' group resolver (ops/groups.py) and is what the
compile step hands to passes as `PassContext.groups`.
The groups are the dimensions of one DeviceMesh ("pp", "dp", "tp"), which DTensor and
torch.distributed.checkpoint use too. With context parallelism (cp > 1) the mesh is ("pp", "dp", "cp_ring",
"cp_ulysses", "tp") — Megatron's tp-cp-dp-pp rank order, planning/layout.py — plus two flattened meshes: "cp"
(cp_ring × cp_ulysses: every rank holding a piece of the same sequences) and "dp_cp" (dp × cp: the replicas of
every parameter, over which gradients and losses are averaged). At cp = 1 the mesh is the three-dimensional one,
"dp_cp" is the "dp" group itself and there are no cp groups, so plans without cp build the same groups (and
c10d group names) as before. With expert parallelism (ep > 1) the mesh is ("pp", "edp", "ep", "tp") and "dp" is
flattened from ("edp", "ep"); with both, the mesh is the whole grid ("pp", "edp", "ep", "cp_ring", "cp_ulysses",
"tp"), with "dp", "cp", "dp_cp" and "edp_cp" (an expert shard's replicas: edp × cp) flattened from it. The
backend follows the device: gloo (cpu), nccl (cuda), hccl (npu).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from graphllm.errors import GraphllmError
from graphllm.ops import groups as op_groups
from graphllm.planning.layout import Coords, Layout

KINDS = ("pp", "dp", "tp", "cp", "cp_ring", "cp_ulysses", "dp_cp", "ep", "edp", "edp_cp")
"""Every group kind."""
WITHOUT_CP = {"dp_cp": "dp", "edp_cp": "edp"}
"""Kinds that at cp 1 are another kind's ranks: that kind's group serves them."""
BACKEND_FOR_DEVICE = {"cpu": "gloo", "cuda": "cpu:gloo,cuda:nccl", "npu": "cpu:gloo,npu:hccl"}
"""Process-group backends per device: on an accelerator, its collective library for device tensors and gloo for
the CPU tensors some host-side exchanges use (checkpoint state gathers, objects)."""


@dataclass(slots=True)
class ParallelState:
    layout: Layout
    rank: int
    coords: Coords
    mesh: object | None  # torch.distributed.device_mesh.DeviceMesh when world_size > 1
    flat: dict = field(default_factory=dict)
    """The flattened meshes by kind ("cp", "dp_cp"; cp > 1), kept as _flatten returned them."""

    def submesh(self, kind: str):
        """The one-dimensional DeviceMesh of this rank's group of `kind` (None: no mesh, or no such group at cp 1)."""
        if self.mesh is None:
            return None
        if kind in self.flat:
            return self.flat[kind]
        if kind in WITHOUT_CP and self.layout.cp == 1:
            kind = WITHOUT_CP[kind]  # the same ranks: one group, not two
            if kind in self.flat:
                return self.flat[kind]
        return self.mesh[kind] if kind in self.mesh.mesh_dim_names else None

    def group(self, kind: str) -> dist.ProcessGroup | None:
        mesh = self.submesh(kind)
        return None if mesh is None else mesh.get_group()

    def size(self, kind: str) -> int:
        return self.layout.group_size(kind)

    def local_rank(self, kind: str) -> int:
        return self.layout.group_rank(kind, self.coords)

    # -- the GroupResolver protocol (ops/groups.py) ----------------------------------------------------
    def process_group(self, kind: str) -> dist.ProcessGroup:
        pg = self.group(kind)
        if pg is None:
            return op_groups.NO_GROUPS.process_group(kind)  # raises the one-line error
        return pg

    def name(self, kind: str) -> str:
        return self.process_group(kind).group_name

    def kinds_by_name(self) -> dict[str, str]:
        """c10d group name → kind, for reading lowered collectives back (graphllm.planning.comm). Kinds that share
        one group (equal rank sets: "cp" and "dp_cp" when dp is 1 and torch reuses the world's group) read
        "cp/dp_cp"; at cp 1 "dp_cp" is the dp group and not listed."""
        out: dict[str, str] = {}
        for kind in KINDS:
            if kind in WITHOUT_CP and self.layout.cp == 1:
                continue
            if (pg := self.group(kind)) is not None:
                name = pg.group_name
                out[name] = f"{out[name]}/{kind}" if name in out else kind
        return out


_STATE: ParallelState | None = None


def launched_world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment, (0, 1) outside it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_parallel(layout: Layout, device: str = "cpu") -> ParallelState:
    """Join the world torchrun started (or none for one process) and build the mesh for `layout`."""
    rank, world = launched_world()
    if world != layout.world_size:
        raise GraphllmError(f"the plan needs {layout.world_size} processes ({layout.describe()}) but {world} were "
                            f"started; run with --nproc {layout.world_size}")
    use_local_device(device)
    mesh, flat = None, {}
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group(BACKEND_FOR_DEVICE[torch.device(device).type])
        mesh, flat = build_mesh(layout, device)
    set_state(ParallelState(layout=layout, rank=rank, coords=layout.coords(rank), mesh=mesh, flat=flat))
    return _STATE


def build_mesh(layout: Layout, device: str):
    """The DeviceMesh of `layout` and its flattened meshes by kind (collective: every rank calls it).

    cp = 1: ("pp", "dp", "tp"), nothing flattened. cp > 1: ("pp", "dp", "cp_ring", "cp_ulysses", "tp"), then "cp" and
    "dp_cp" flattened from them (DeviceMesh._flatten: the groups are created once, in the same order on every
    rank). ep > 1: ("pp", "edp", "ep", "tp") and "dp" flattened from ("edp", "ep"); both: the whole grid, and "edp_cp"
    flattened from ("edp", "cp_ring", "cp_ulysses") too."""
    from torch.distributed.device_mesh import init_device_mesh

    sizes = layout.grid_sizes()
    if layout.ep > 1 and layout.cp > 1:
        names = ("pp", "edp", "ep", "cp_ring", "cp_ulysses", "tp")
        flatten = {"dp": ("edp", "ep"), "cp": ("cp_ring", "cp_ulysses"), "dp_cp": ("edp", "ep", "cp_ring", "cp_ulysses"),
                   "edp_cp": ("edp", "cp_ring", "cp_ulysses")}
    elif layout.ep > 1:
        names, flatten = ("pp", "edp", "ep", "tp"), {"dp": ("edp", "ep")}
    elif layout.cp > 1:
        names = ("pp", "dp", "cp_ring", "cp_ulysses", "tp")
        flatten = {"cp": ("cp_ring", "cp_ulysses"), "dp_cp": ("dp", "cp_ring", "cp_ulysses")}
    else:
        names, flatten = ("pp", "dp", "tp"), {}
    mesh = init_device_mesh(device, tuple(sizes[n] for n in names), mesh_dim_names=names)
    flat = {kind: mesh[dims]._flatten(kind) for kind, dims in flatten.items()}
    return mesh, flat


def use_local_device(device: str) -> None:
    """One accelerator per local rank: make device LOCAL_RANK (torchrun's, or Slurm's SLURM_LOCALID read by
    graphllm.slurm_env) the current one, so tensors made on "cuda"/"npu" land on this rank's own device."""
    kind = torch.device(device).type
    if kind not in ("cuda", "npu") or "LOCAL_RANK" not in os.environ:
        return
    module = getattr(torch, kind)
    local = int(os.environ["LOCAL_RANK"])
    if local >= module.device_count():
        raise GraphllmError(f"LOCAL_RANK {local} but this node has {module.device_count()} {kind} device(s); start "
                            f"at most that many ranks per node")
    module.set_device(local)


def set_state(state: ParallelState | None) -> None:
    """Make `state` this process's parallel state and the ops' group resolver."""
    global _STATE
    _STATE = state
    op_groups.install(state)


def state() -> ParallelState | None:
    """This process's parallel state; None when running as one process without a layout."""
    return _STATE


def group_for(kind: str) -> dist.ProcessGroup:
    """The ProcessGroup of this rank for a kind; a clear error when none was set up."""
    return op_groups.resolver().process_group(kind)


def group_name(kind: str) -> str:
    """The c10d name of this rank's group for a kind (what `_c10d_functional` ops take)."""
    return op_groups.resolver().name(kind)


def destroy() -> None:
    set_state(None)
    if dist.is_initialized():
        dist.destroy_process_group()


def all_ranks_agree(value: int) -> bool:
    """True when every rank passes the same integer (a cheap consistency check of plans and graphs)."""
    if not dist.is_initialized():
        return True
    t = torch.tensor([value, -value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t[0]) == value and int(-t[1]) == value


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (itself outside a process group)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank ([obj] outside a process group)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
