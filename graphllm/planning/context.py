"""Context parallelism's token layout and ring schedule: which tokens each rank holds, which blocks it attends.

The sequence of S tokens is split over `cp` ranks. With `ulysses` = U ranks in each all-to-all group and
R = cp / U ranks around the ring, the ring layout cuts the sequence into 2R chunks of c = S / (2R) tokens and
gives ring rank r chunks r and 2R-1-r (zig-zag: an early chunk and a late one, so every rank's causal work is
the same); `order="contiguous"` gives ring rank r chunks 2r and 2r+1 instead (the unbalanced layout, kept for
the load-balance benchmark). Those 2c tokens, in that order, are what the ring rank attends with; its U
Ulysses ranks each hold one contiguous U-th of them (cp rank = r·U + u), and the Ulysses all-to-all puts the
2c back together on every one of them. Pure Ulysses is R = 1 (the whole sequence, contiguous pieces); pure
ring is U = 1.

`ring_schedule` says, for one ring rank and each ring step (step i holds the keys/values of ring rank
(r - i) mod R), which (query rows, key rows) blocks are visible and whether the block is the causal diagonal.
Rows are positions in the 2c-token local order. Both the graph pass (passes/context_parallel.py) and the
benchmark of load balance read it, so what is measured is what the graphs compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from graphllm.errors import GraphllmError

Order = Literal["zigzag", "contiguous"]


def ring_chunks(ring: int, r: int, order: Order = "zigzag") -> tuple[int, int]:
    """The two chunk indices (of 2·ring) ring rank r holds, in its local order."""
    return (r, 2 * ring - 1 - r) if order == "zigzag" else (2 * r, 2 * r + 1)


def ring_tokens(seq_len: int, ring: int, r: int, order: Order = "zigzag") -> list[int]:
    """Global token positions of ring rank r's 2c tokens, in local order (one ring rank: all of them)."""
    if ring == 1:
        return list(range(seq_len))
    c = seq_len // (2 * ring)
    out: list[int] = []
    for chunk in ring_chunks(ring, r, order):
        out.extend(range(chunk * c, (chunk + 1) * c))
    return out


def cp_token_index(seq_len: int, cp: int, ulysses: int = 1, order: Order = "zigzag") -> list[list[int]]:
    """For each cp rank, the global positions of the tokens it holds (what the data feed gives it)."""
    check_divisible(seq_len, cp, ulysses)
    ring = cp // ulysses
    out = []
    for rank in range(cp):
        r, u = divmod(rank, ulysses)
        tokens = ring_tokens(seq_len, ring, r, order)
        width = len(tokens) // ulysses
        out.append(tokens[u * width:(u + 1) * width])
    return out


def check_divisible(seq_len: int, cp: int, ulysses: int) -> None:
    """The sequence must cut into 2·cp chunks with a ring (zig-zag), into cp pieces for Ulysses alone."""
    if ulysses < 1 or cp % ulysses:
        raise GraphllmError(f"--cp-ulysses {ulysses} does not divide --cp {cp}; choose a divisor of --cp")
    if ulysses == cp:
        if seq_len % cp:
            raise GraphllmError(f"--seq-len {seq_len} is not divisible by --cp {cp} (Ulysses gives each rank "
                                f"1/cp of the sequence); use a multiple of {cp}")
        return
    unit = 2 * cp
    if seq_len % unit:
        raise GraphllmError(f"--seq-len {seq_len} is not divisible by 2·cp = {unit} (ring attention cuts the "
                            f"sequence into 2·cp chunks for its zig-zag load balance); use a multiple of {unit}")


@dataclass(frozen=True, slots=True)
class Block:
    """Query rows [q0, q1) attend key rows [k0, k1) of the step's keys; `causal`: the diagonal block."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool

    @property
    def work(self) -> int:
        """Score entries that are not masked (half of a causal square, diagonal included)."""
        q, k = self.q1 - self.q0, self.k1 - self.k0
        return q * (q + 1) // 2 if self.causal else q * k


@dataclass(frozen=True, slots=True)
class RingStep:
    step: int
    source: int
    """The ring rank whose keys/values this step holds."""
    blocks: tuple[Block, ...]


def ring_schedule(local_len: int, ring: int, r: int, order: Order = "zigzag") -> list[RingStep]:
    """Visible blocks of ring rank r at each step, for `local_len` = 2c tokens per ring rank.

    Chunks are c tokens; a query chunk sees a key chunk wholly when the key chunk is earlier, nothing
    when later, and causally when it is the same chunk. Per step, query chunks that see the same key
    rows and sit next to each other become one block (zig-zag: one block per step after the first). Step 0
    (the rank's own keys) is one causal block: positions rise along the local order in both layouts."""
    c = local_len // 2
    mine = ring_chunks(ring, r, order)
    steps = [RingStep(step=0, source=r, blocks=(Block(0, local_len, 0, local_len, True),))]  # own: causal
    for i in range(1, ring):
        j = (r - i) % ring
        theirs = ring_chunks(ring, j, order)
        per_q: list[tuple[int, int, bool] | None] = []  # per query chunk: visible key rows (k0, k1, causal)
        for qc in mine:
            seen = [(kk, kc == qc) for kk, kc in enumerate(theirs) if kc <= qc]
            if not seen:
                per_q.append(None)
                continue
            local = [kk for kk, _ in seen]
            if local != list(range(local[0], local[-1] + 1)):
                raise AssertionError("visible key chunks are not adjacent")  # impossible for these orders
            per_q.append((local[0] * c, (local[-1] + 1) * c, any(diag for _, diag in seen)))
        steps.append(RingStep(step=i, source=j, blocks=tuple(_merge_rows(per_q, c))))
    return steps


def _merge_rows(per_q: list[tuple[int, int, bool] | None], c: int) -> list[Block]:
    """Adjacent query chunks with the same visible key rows (and no diagonal) become one block."""
    blocks: list[Block] = []
    for qi, seen in enumerate(per_q):
        if seen is None:
            continue
        k0, k1, causal = seen
        prev = blocks[-1] if blocks else None
        if (prev is not None and not causal and not prev.causal and prev.q1 == qi * c
                and (prev.k0, prev.k1) == (k0, k1)):
            blocks[-1] = Block(prev.q0, (qi + 1) * c, k0, k1, False)
            continue
        blocks.append(Block(qi * c, (qi + 1) * c, k0, k1, causal))
    return blocks


def step_work(local_len: int, ring: int, order: Order = "zigzag") -> list[int]:
    """Score entries each ring rank computes over all steps (the load-balance figure of the layout)."""
    return [sum(b.work for s in ring_schedule(local_len, ring, r, order) for b in s.blocks) for r in range(ring)]
