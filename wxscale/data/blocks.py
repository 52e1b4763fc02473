"""Blocks: runs of whole time chunks that the streaming loader reads in one go, and their order per epoch.

A split's windows are grouped by the block that holds their last input step.
Blocks start at multiples of `block_steps`, a multiple of the store's time
chunk, so a block owns whole chunks. Its read range also covers the inputs
before its first window and the targets after its last window (the halo), so
a block read touches at most one chunk before and one chunk after the ones it
owns. That extra read is at most 2 chunks per block. Within one rank's epoch,
`hand_over_boundary_windows` and `plan_block_reads` remove most of it: of two
neighbouring blocks, the one read first keeps the halo steps of the other, and
the other copies them instead of fetching the chunk again.

Order: each epoch permutes the blocks with a generator seeded by (seed, epoch).
Rank r of R takes positions r, r + R, r + 2R, ... of the permutation, so the
ranks own disjoint blocks and together every block, once per epoch. Within a
rank, the windows of `shuffle_blocks` consecutive blocks are permuted together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from wxscale.data.windows import WindowLayout


@dataclass(frozen=True)
class Block:
    """One read: the time steps [read_start, read_stop) and the windows whose last input lies in [start, stop)."""

    index: int
    start: int
    stop: int
    read_start: int
    read_stop: int
    windows: np.ndarray  # last-input indices into the data's time axis, increasing

    @property
    def read_steps(self) -> int:
        return self.read_stop - self.read_start


def block_steps_for(chunk_steps: int, step_bytes: int, target_bytes: float, max_bytes: float) -> int:
    """Return the time steps per block: whole chunks, about `target_bytes`, never over `max_bytes` unless one chunk is.

    With a time chunk larger than `max_bytes`, a block is as many steps as fit
    `max_bytes` (at least one), and is then not aligned to chunks.
    """
    chunk_bytes = chunk_steps * step_bytes
    if chunk_bytes > max_bytes:
        return max(1, int(max_bytes // step_bytes))
    chunks = max(1, int(min(target_bytes, max_bytes) // chunk_bytes))
    return chunks * chunk_steps


def plan_blocks(windows: np.ndarray, layout: WindowLayout, block_steps: int) -> list[Block]:
    """Group `windows` (last-input indices) into blocks of `block_steps` aligned steps; empty blocks are left out."""
    windows = np.sort(np.asarray(windows, dtype=np.int64))
    if len(windows) == 0:
        return []
    keys = windows // block_steps
    boundaries = np.flatnonzero(np.diff(keys)) + 1
    blocks = []
    for index, group in enumerate(np.split(windows, boundaries)):
        start = int(group[0] // block_steps) * block_steps
        blocks.append(
            Block(
                index=index,
                start=start,
                stop=start + block_steps,
                read_start=int(group[0]) - layout.span_back,
                read_stop=int(group[-1]) + layout.lead_steps + 1,
                windows=group,
            )
        )
    return blocks


def epoch_order(n_blocks: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Return the block positions of one epoch: a permutation seeded by (seed, epoch), or 0..n-1 unshuffled."""
    if not shuffle:
        return np.arange(n_blocks)
    return np.random.default_rng([seed, epoch]).permutation(n_blocks)


def rank_blocks(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Return the positions of `order` that `rank` reads: every world_size-th, starting at `rank`."""
    return order[rank::world_size]


def shuffle_group(
    windows: list[tuple[int, int]], seed: int, epoch: int, rank: int, group: int
) -> list[tuple[int, int]]:
    """Return the (slot, window) pairs of one shuffle group in an order seeded by (seed, epoch, rank, group)."""
    generator = np.random.default_rng([seed, epoch, rank, group])
    return [windows[i] for i in generator.permutation(len(windows))]


def halo_overhead(block_steps: int, chunk_steps: int, layout: WindowLayout) -> float:
    """Return the worst-case read amplification of aligned blocks: chunks read / chunks owned.

    The inputs of a block's first window reach back `span_back` steps, into
    ceil(span_back / chunk_steps) chunks before the block at most, and the target
    of its last window `lead_steps` steps, into ceil(lead_steps / chunk_steps) after it.
    """
    owned = max(1, math.ceil(block_steps / chunk_steps))
    before = math.ceil(layout.span_back / chunk_steps)
    after = math.ceil(layout.lead_steps / chunk_steps)
    return (owned + before + after) / owned


@dataclass(frozen=True)
class BlockRead:
    """Plan of one block read in an epoch: the range its reader fetches, and the halos earlier blocks pass on.

    Ranges are absolute time steps [start, stop). `read` is one contiguous range
    fetched from storage. `shared` are halo ranges copied from blocks read
    earlier in the epoch, which then do not fetch the neighbouring chunk again.
    `keep` are ranges of this block's steps to keep for blocks read later.
    """

    block: Block
    read: tuple[int, int]
    shared: tuple[tuple[int, int], ...] = ()
    keep: tuple[tuple[int, int], ...] = ()


def owned_range(block: Block) -> tuple[int, int]:
    """Return the steps of a block's read range that lie inside the block, so in chunks it owns."""
    return max(block.read_start, block.start), min(block.read_stop, block.stop)


def plan_block_reads(blocks: list[Block], step_bytes: int, budget_bytes: float) -> list[BlockRead]:
    """Plan the reads of `blocks`, in reading order, so that a halo already read by a neighbour is not fetched again.

    A block's halo lies in its neighbours' chunks: the `span_back` steps before
    its first window and the `lead_steps` steps after its last one. When the
    neighbour holding a halo is read earlier in the same list, and the halo lies
    in that neighbour's owned range, the neighbour keeps a copy of those steps
    and the later block takes them from it. Copies wait from the neighbour's read
    to the later block's read. A copy is kept only while all copies waiting
    together stay within `budget_bytes`, so that memory stays bounded. The other
    halos are fetched again, which costs a chunk read.
    """
    position = {block.index: i for i, block in enumerate(blocks)}
    ending_at = {block.stop: block for block in blocks}
    starting_at = {block.start: block for block in blocks}

    def contains(outer: tuple[int, int], inner: tuple[int, int]) -> bool:
        return outer[0] <= inner[0] and inner[1] <= outer[1]

    halo_users: dict[tuple[int, int], int] = {}  # kept halo range -> position of the block that uses it
    release_at: dict[int, list[int]] = {}  # position -> bytes freed there
    live_bytes = 0
    plans = []
    for i, block in enumerate(blocks):
        for freed in release_at.pop(i, []):
            live_bytes -= freed
        low, high = owned_range(block)
        shared = []
        if block.read_start < low and halo_users.pop((block.read_start, low), None) == i:
            shared.append((block.read_start, low))
            low_read = low
        else:
            low_read = block.read_start
        if high < block.read_stop and halo_users.pop((high, block.read_stop), None) == i:
            shared.append((high, block.read_stop))
            high_read = high
        else:
            high_read = block.read_stop

        # Halos of later neighbours that lie in this block's owned range.
        keep = []
        for neighbour in (ending_at.get(block.start), starting_at.get(block.stop)):
            if neighbour is None or position[neighbour.index] <= i:
                continue
            n_low, n_high = owned_range(neighbour)
            if neighbour.stop == block.start:  # the block before: its target halo lies at this block's start
                halo = (n_high, neighbour.read_stop)
            else:  # the block after: its input halo lies at this block's end
                halo = (neighbour.read_start, n_low)
            if halo[0] >= halo[1] or not contains((low, high), halo):
                continue
            size = (halo[1] - halo[0]) * step_bytes
            if live_bytes + size > budget_bytes:
                continue
            live_bytes += size
            halo_users[halo] = position[neighbour.index]
            release_at.setdefault(position[neighbour.index], []).append(size)
            keep.append(halo)
        plans.append(BlockRead(block, (low_read, high_read), tuple(shared), tuple(keep)))
    return plans


def hand_over_boundary_windows(blocks: list[Block], layout: WindowLayout) -> list[Block]:
    """Return `blocks` (one rank's blocks of an epoch, in reading order) with boundary windows moved to later blocks.

    A window whose steps lie in two neighbouring blocks makes both of them read
    the other's chunks: the earlier block reads the first `lead_steps` steps
    after it, the later one the `span_back` steps before it. Moving those
    windows from the block read first to its neighbour read later leaves a halo
    on one side only, and `plan_block_reads` then copies it from the block read
    first instead of fetching its chunk again. A window moves only between
    blocks of the same list, so each rank keeps its windows, and a block keeps
    at least one window.
    """
    position = {block.index: i for i, block in enumerate(blocks)}
    starting_at = {block.start: block for block in blocks}
    windows = {block.index: np.asarray(block.windows) for block in blocks}
    for block in sorted(blocks, key=lambda b: b.start):
        after = starting_at.get(block.stop)
        if after is None:
            continue
        if position[block.index] < position[after.index]:
            giver, taker = block, after
            own = windows[giver.index]
            moving = own[own + layout.lead_steps >= giver.stop]
        else:
            giver, taker = after, block
            own = windows[giver.index]
            moving = own[own - layout.span_back < giver.start]
        if len(moving) == 0 or len(moving) == len(own):
            continue
        windows[giver.index] = np.setdiff1d(own, moving)
        windows[taker.index] = np.union1d(windows[taker.index], moving)

    moved = []
    for block in blocks:
        group = windows[block.index]
        if len(group) == len(block.windows) and np.array_equal(group, block.windows):
            moved.append(block)
            continue
        moved.append(replace(
            block,
            read_start=int(group[0]) - layout.span_back,
            read_stop=int(group[-1]) + layout.lead_steps + 1,
            windows=group,
        ))
    return moved
