"""Blocks: runs of whole time chunks that the streaming loader reads in one go, and their order per epoch.

A split's windows are grouped by the block that holds their last input step.
Blocks start at multiples of `block_steps`, a multiple of the store's time
chunk, so a block owns whole chunks. Its read range also covers the inputs
before its first window and the targets after its last window (the halo), so
a block read touches at most one chunk before and one chunk after the ones it
owns. That extra read is at most 2 chunks per block.

Order: each epoch permutes the blocks with a generator seeded by (seed, epoch).
Rank r of R takes positions r, r + R, r + 2R, ... of the permutation, so the
ranks own disjoint blocks and together every block, once per epoch. Within a
rank, the windows of `shuffle_blocks` consecutive blocks are permuted together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
