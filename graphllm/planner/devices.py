"""The device table the planner prices plans with: one entry per accelerator, and a probe for `cpu`.

Figures are dense bf16 peak FLOP/s (no sparsity), HBM bandwidth, the per-device link bandwidth inside a node
(one direction) and across nodes (the device's share of the node's NICs, one direction), memory and devices per
node. They are vendor-published peaks; the planner multiplies them by efficiencies (`DeviceSpec.mfu_ceiling`,
`link_efficiency`) because no step reaches its peak. Check them against your own cluster's datasheet and pass
`--device-memory` for the memory you may actually use.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, replace

from graphllm.errors import GraphllmError

GB = 1e9
GiB = 2**30


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceSpec:
    name: str
    peak_flops: float
    """Dense bf16 (fp32 for cpu) FLOP/s of one device."""
    hbm_bandwidth: float
    """Bytes/s of device memory."""
    intra_node_bandwidth: float
    """Bytes/s one device sends to its node's peers (one direction)."""
    inter_node_bandwidth: float
    """Bytes/s one device sends across nodes (one direction)."""
    memory: int
    """Bytes of device memory."""
    devices_per_node: int
    mfu_ceiling: float = 0.6
    """Fraction of `peak_flops` that matmul-class ops reach (large bf16 GEMMs reach 60-75% on these parts)."""
    link_efficiency: float = 0.7
    """Fraction of link bandwidth collectives reach (bus bandwidth of NCCL/HCCL ring collectives at large sizes)."""
    collective_latency: float = 10e-6
    """Seconds one collective call costs before its bytes move (the α of an α + bytes/bandwidth model): launch,
    synchronisation with the peers, the ring's first hop. NCCL and HCCL small-message all-reduce inside a node
    take ~10-30 µs; 10 µs for NVLink parts, 20 µs for HCCS/UB (the table's entries)."""
    min_cut: bool = True
    """The device's graphllm backend partitions recompute `none` with a min-cut partitioner (inductor, on cuda and
    cpu); False: aot_autograd's default partition (the npu backend), which saves more (measure.Key.min_cut)."""
    host_bandwidth: float = 55 * GB
    """Bytes/s between host memory and the device, one direction (what an offloaded optimizer streams): the
    device's PCIe link at pinned-memory copy rates. On `cpu` host and device are one memory: the copy bandwidth."""
    gather_copies: int = 0
    """Extra parameter-sized copies an all-gather of the updated parameters makes (ZeRO-1's step): NCCL and HCCL
    gather into the output tensor (0); gloo, the cpu backend, gathers into its own buffer and copies out (1)."""
    source: str = ""


HOST_LINK_ASCEND = 28 * GB
"""Host↔NPU bytes/s assumed for 910B/910C: a PCIe 4.0 x16-class link (32 GB/s one direction) at pinned-copy rates —
the least certain figure of the table (check your server's host interface); H100/H200 take PCIe 5.0 x16 (64 GB/s
one direction, ~55 GB/s reached by pinned copies: DeviceSpec.host_bandwidth's default)."""

DEVICES: dict[str, DeviceSpec] = {
    # Ascend 910B (Atlas 800T A2 training server, 8 NPUs per node): Huawei's Atlas 800T A2 datasheet and
    # the Ascend 910B public specs: ~313 TFLOPS FP16/BF16 dense (910B3; 910B2 ~376), 64 GB HBM2e at ~1.6 TB/s,
    # HCCS full mesh 7 links x 56 GB/s = 392 GB/s (one direction ~196), 8 x 200 GbE RoCE per node (25 GB/s per NPU).
    "a2": DeviceSpec(name="Ascend 910B (A2)", peak_flops=313e12, hbm_bandwidth=1.6e12, intra_node_bandwidth=196 * GB,
                     inter_node_bandwidth=25 * GB, memory=64 * GiB, devices_per_node=8, collective_latency=20e-6,
                     min_cut=False, host_bandwidth=HOST_LINK_ASCEND,
                     source="Huawei Atlas 800T A2 datasheet / Ascend 910B specs"),
    # Ascend 910C (Atlas 900 A3 SuperPoD / CloudMatrix 384): Huawei's CloudMatrix 384 paper (arXiv 2506.12708):
    # ~752 TFLOPS BF16 dense per 910C (two dies), 128 GB HBM at ~3.2 TB/s, UB fabric 392 GB/s per die
    # unidirectional inside the SuperPoD (treated as one 384-NPU "node"), RDMA plane 400 Gb/s (50 GB/s) per NPU.
    "a3": DeviceSpec(name="Ascend 910C (A3)", peak_flops=752e12, hbm_bandwidth=3.2e12, intra_node_bandwidth=392 * GB,
                     inter_node_bandwidth=50 * GB, memory=128 * GiB, devices_per_node=384, collective_latency=20e-6,
                     min_cut=False, host_bandwidth=HOST_LINK_ASCEND,
                     source="Huawei CloudMatrix 384 paper (arXiv 2506.12708)"),
    # NVIDIA H100 SXM5 80GB: NVIDIA H100 datasheet: 989 TFLOPS BF16 dense (1979 with sparsity), HBM3 3.35 TB/s,
    # NVLink 4 900 GB/s bidirectional (450 one way), DGX H100: 8 x 400 Gb/s ConnectX-7 = 50 GB/s per GPU.
    "h100": DeviceSpec(name="NVIDIA H100 SXM", peak_flops=989e12, hbm_bandwidth=3.35e12, intra_node_bandwidth=450 * GB,
                       inter_node_bandwidth=50 * GB, memory=80 * GB, devices_per_node=8,
                       source="NVIDIA H100 Tensor Core GPU datasheet; DGX H100 user guide"),
    # NVIDIA H200 SXM 141GB: NVIDIA H200 datasheet: 989 TFLOPS BF16 dense, HBM3e 4.8 TB/s, NVLink 900 GB/s
    # bidirectional; HGX H200 nodes with 8 x 400 Gb/s NICs (50 GB/s per GPU).
    "h200": DeviceSpec(name="NVIDIA H200 SXM", peak_flops=989e12, hbm_bandwidth=4.8e12, intra_node_bandwidth=450 * GB,
                       inter_node_bandwidth=50 * GB, memory=141 * GB, devices_per_node=8,
                       source="NVIDIA H200 Tensor Core GPU datasheet"),
}
KNOWN = (*DEVICES, "cpu")

GLOO_CALL_LATENCY = 130e-6
"""Seconds one gloo collective call costs on one host (TCP loopback): the median of a 2-rank 4-byte all_reduce on
the 2-core validation machine was 130 µs (all_gather 150 µs); gloo's own per-call work, not the socket's (a
loopback round trip is ~4 µs)."""
GLOO_WIRE_EFFICIENCY = 0.5
"""Fraction of the loopback socket's probed bytes/s a gloo ring collective reaches: 2-rank all_reduce / all_gather
of 16 MiB moved 1.3-1.5 GB/s where one socket moved 2.3-4.3 GB/s (gloo copies into and out of its buffers)."""
PROBE_REPEATS = 7
"""Timed repeats of each cpu probe; the median is kept (a best-of is optimistic on a shared, loaded machine)."""

_CPU: dict[int, DeviceSpec] = {}


def device_spec(name: str, *, memory: int | None = None) -> DeviceSpec:
    """The table's entry (or the probed `cpu`), with `memory` overriding its size; unknown names: one line."""
    if name == "cpu":
        spec = cpu_spec()
    elif name in DEVICES:
        spec = DEVICES[name]
    else:
        raise GraphllmError(f"unknown --device {name!r}; known devices: {', '.join(KNOWN)}")
    return replace(spec, memory=memory) if memory is not None else spec


def cpu_spec(*, threads: int | None = None, refresh: bool = False) -> DeviceSpec:
    """This machine measured once per process and thread count: an fp32 matmul's FLOP/s and a large copy's bytes/s
    at `threads` intra-op threads (None: torch's current count; ranks sharing a host should each probe at their
    own, cores ÷ ranks), the median of PROBE_REPEATS; /proc/meminfo's MemTotal. Ranks on one host talk through gloo
    over TCP loopback: links are priced at a probed loopback socket's rate × GLOO_WIRE_EFFICIENCY, each call at
    GLOO_CALL_LATENCY. `refresh` probes again (the machine's load changed)."""
    import torch

    n = threads or torch.get_num_threads()
    if refresh or n not in _CPU:
        saved = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            flops, bandwidth = _probe_matmul(), _probe_copy()
        finally:
            torch.set_num_threads(saved)
        link = _probe_loopback() * GLOO_WIRE_EFFICIENCY
        _CPU[n] = DeviceSpec(name=f"cpu ({os.cpu_count()} cores, {n} thread(s), probed)", peak_flops=flops,
                             hbm_bandwidth=bandwidth, intra_node_bandwidth=link, inter_node_bandwidth=link,
                             memory=_mem_total(), devices_per_node=max(1, os.cpu_count() or 1), mfu_ceiling=1.0,
                             link_efficiency=1.0, collective_latency=GLOO_CALL_LATENCY, gather_copies=1,
                             host_bandwidth=bandwidth,
                             source="measured here (matmul, copy and loopback probes)")
    return _CPU[n]


def _median_seconds(fn, repeats: int = PROBE_REPEATS) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _probe_matmul(n: int = 1024) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / _median_seconds(lambda: a @ b)


def _probe_copy(nbytes: int = 128 * 2**20) -> float:
    import torch

    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    return 2 * nbytes / _median_seconds(lambda: dst.copy_(src))  # read + write


def _probe_loopback(nbytes: int = 16 * 2**20) -> float:
    """Bytes/s one TCP loopback connection moves (what gloo's transport rides on), a thread receiving."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    a = socket.create_connection(srv.getsockname())
    b, _ = srv.accept()
    srv.close()
    payload, view = bytes(nbytes), memoryview(bytearray(nbytes))

    def recv() -> None:
        got = 0
        while got < nbytes:
            got += b.recv_into(view[got:], nbytes - got)

    def once() -> None:
        th = threading.Thread(target=recv)
        th.start()
        a.sendall(payload)
        th.join()
    try:
        return nbytes / _median_seconds(once, repeats=3)
    finally:
        a.close()
        b.close()


def _mem_total() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 * GiB


def parse_bytes(text: str) -> int:
    """`64GiB`, `80GB`, `512MiB`, `1e9` → bytes; anything else: one line."""
    units = {"tib": 2**40, "gib": GiB, "mib": 2**20, "kib": 2**10, "tb": 1e12, "gb": GB, "mb": 1e6, "kb": 1e3, "b": 1}
    s = text.strip().lower().replace(" ", "")
    for unit, factor in units.items():
        if s.endswith(unit):
            s, mult = s[: -len(unit)], factor
            break
    else:
        mult = 1
    try:
        value = float(s) * mult
    except ValueError:
        raise GraphllmError(f"--device-memory {text!r} is not a size (e.g. 64GiB, 80GB)") from None
    if value <= 0:
        raise GraphllmError(f"--device-memory {text!r} must be positive")
    return int(value)
