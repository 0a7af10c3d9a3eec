"""The `npu-emulated` backend's runtime: torch_npu's kernels registered on CPU from the wheel's schemas.

`graphllm compile --backend npu --dry-run` (and `--backend npu-emulated`) lower graphllm's ops to the same
`torch.ops.npu.*` calls as on an Ascend machine; here those kernels are graphllm.preflight.npu_kernels'
CPU emulations, defined with the exact schemas of the torch_npu wheel graphllm.preflight.wheel finds, and
the MC2 kernels take c10d group names where HCCL takes communicator names.

torchair's own collective `npu_define.all_to_all_single_npu` (what the npu lowering of context parallelism
emits: passes/lower_collectives.py) exists only once torchair is imported, which never happens here: it is
defined from its schema in the wheel's torchair sources, with a kernel that runs the all-to-all over the
process group torchair would find (gloo on CPU), and a fake kernel with torchair's meta rule.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import torch
import torch.distributed as dist

from graphllm.errors import GraphllmError
from graphllm.ops.cp_collectives import TORCHAIR_ALL_TO_ALL
from graphllm.preflight.wheel import TORCHAIR_DIR

ALL_TO_ALL_SOURCE = "_ge_concrete_graph/ge_converter/experimental/hcom_alltoall.py"
"""Where torchair defines the op (under TORCHAIR_DIR), with `npu_define_lib.define("<schema>")`."""

_lib: torch.library.Library | None = None  # the npu_define fragment, kept alive for the process


def load_emulated_kernels() -> None:
    """Register the emulated kernels (once per process); refused where the real torch_npu is loaded."""
    from graphllm.ops.lowering_npu_mc2 import emulate_hcom
    from graphllm.preflight.npu_kernels import register_npu_kernels
    from graphllm.preflight.wheel import npu_schemas, torch_npu_sources

    root = torch_npu_sources()
    register_npu_kernels(npu_schemas(root))
    register_all_to_all(all_to_all_schema(root))
    emulate_hcom()


def all_to_all_schema(root: Path) -> str:
    """The schema torchair defines all_to_all_single_npu with, read from its source under `root` (a folder holding
    torch_npu/, as graphllm.preflight.wheel.torch_npu_sources gives it)."""
    path = root / TORCHAIR_DIR / ALL_TO_ALL_SOURCE
    name = TORCHAIR_ALL_TO_ALL.split("::")[1]
    if path.is_file():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "define" and node.args
                    and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith(name + "(")):
                return " ".join(node.args[0].value.split())  # the source continues the string over two lines
    raise GraphllmError(f"{path}: no `.define(\"{name}(...)\")`; torchair moved its all-to-all op: update "
                        "graphllm.preflight.emulation.ALL_TO_ALL_SOURCE")


def _row_numel(x: torch.Tensor) -> int:
    """Elements per dim-0 row: torchair's kernel turns element counts back into split sizes with it."""
    return 1 if x.dim() == 1 else math.prod(x.shape[1:])


def all_to_all_single_npu(input, send_counts, send_displacements, recv_counts, recv_displacements, tag, ranks,
                          group_size):
    """torchair's kernel (hcom_alltoall.py npu_all_to_all_single_npu) on the process group of `tag` and `ranks`:
    counts are elements of the flattened input, split along dim 0. Stricter than it: the group must exist (torchair
    would create one), and the displacements must be each piece right after the previous one (the only layout
    torchair's own eager kernel handles: it ignores them)."""
    pg = dist.distributed_c10d._find_pg_by_ranks_and_tag(tag, sorted(ranks))
    if pg is None or group_size != len(ranks) or pg.size() != group_size:
        raise ValueError(f"all_to_all_single_npu: no process group with tag {tag!r} and ranks {list(ranks)} "
                         f"(group_size {group_size})")
    if dist.get_process_group_ranks(pg) != list(ranks):
        raise ValueError(f"all_to_all_single_npu: ranks {list(ranks)} are not the group's rank order "
                         f"{dist.get_process_group_ranks(pg)}")
    row = _row_numel(input)
    for what, counts, at in (("send", send_counts, send_displacements), ("recv", recv_counts, recv_displacements)):
        if len(counts) != group_size or any(c % row for c in counts):
            raise ValueError(f"all_to_all_single_npu: {what}_counts {list(counts)} must be {group_size} multiples of "
                             f"the {row} elements of a dim-0 row")
        if list(at) != [sum(counts[:i]) for i in range(group_size)]:
            raise NotImplementedError(f"emulated: {what}_displacements must be the running sums of the counts; "
                                      f"got {list(at)} for {list(counts)}")
    if sum(send_counts) != input.numel():
        raise ValueError(f"all_to_all_single_npu: send_counts sum to {sum(send_counts)}, input has {input.numel()}")
    out = input.new_empty([sum(recv_counts) // row, *input.shape[1:]])
    dist.all_to_all_single(out, input.contiguous(), output_split_sizes=[c // row for c in recv_counts],
                           input_split_sizes=[c // row for c in send_counts], group=pg)
    return out


def all_to_all_single_npu_fake(input, send_counts, send_displacements, recv_counts, recv_displacements, tag, ranks,
                               group_size):
    """torchair's meta kernel (npu_all_to_all_single_npu_meta): no recv_counts means an equal split."""
    row = _row_numel(input)
    if len(recv_counts) == 0:
        recv_counts = [input.shape[0] * row // group_size] * group_size
    return input.new_empty([sum(recv_counts) // row, *input.shape[1:]])


def register_all_to_all(schema: str) -> None:
    """Define TORCHAIR_ALL_TO_ALL with `schema` (torchair's, all_to_all_schema) unless torchair already has, with the
    CPU kernel and fake kernel above. Like torchair, mark it side-effecting (never dead code). A second call is a
    no-op."""
    global _lib
    ns, name = TORCHAIR_ALL_TO_ALL.split("::")
    if _lib is not None or hasattr(getattr(torch.ops, ns), name):
        return
    lib = torch.library.Library(ns, "FRAGMENT")  # FRAGMENT: torchair's `Library(ns, "DEF")` may still come later
    lib.define(schema)
    lib.impl(name, all_to_all_single_npu, "CPU")
    torch.library.register_fake(TORCHAIR_ALL_TO_ALL, all_to_all_single_npu_fake, lib=lib)
    torch.fx.node.has_side_effect(getattr(getattr(torch.ops, ns), name).default)
    _lib = lib
