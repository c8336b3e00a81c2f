"""Row-major flat token ranges as disjoint boxes of the grid: the one decomposition every layer counts with.

A range of consecutive row-major tokens is not a box, but it is a union of at most ``2*rank - 1``
disjoint boxes, and boxes are what the closed-form counts (``maskdsl.analysis.counts.mask_box_counts``)
take. Sink tokens (a prefix), top-k blocks (ranges of ``block`` tokens) and row-major kernel tiles
(ranges of ``prod(tile)`` tokens) are all such ranges.
"""

from __future__ import annotations

import math

import numpy as np


def flat_range_boxes(shape: tuple[int, ...], a: int, b: int) -> list[tuple[tuple[int, int], ...]]:
    """The row-major flat range [a, b) as disjoint boxes ((start, stop) per dimension), in order.

    Peel the range from the left until ``a`` is aligned to the largest block it can be, take the
    whole aligned middle, then peel the right end: at most ``2*rank - 1`` boxes.
    """
    rank = len(shape)
    strides = [math.prod(shape[k + 1:]) for k in range(rank)]
    boxes: list[tuple[tuple[int, int], ...]] = []

    def coords(flat):
        return [(flat // strides[k]) % shape[k] for k in range(rank)]

    def box(start, level, count):
        """`count` consecutive blocks of size strides[level], from flat `start` (aligned to it)."""
        c = coords(start)
        return tuple((c[k], c[k] + 1) for k in range(level)) + ((c[level], c[level] + count),) + tuple(
            (0, shape[k]) for k in range(level + 1, rank))

    pos = a
    # left: climb from the finest level while pos is not aligned to the next coarser block
    for level in range(rank - 1, 0, -1):
        step, coarse = strides[level], strides[level - 1]
        if pos % coarse == 0:
            continue
        upto = min(b, (pos // coarse + 1) * coarse)
        count = (upto - pos) // step
        if count:
            boxes.append(box(pos, level, count))
            pos += count * step
        if pos < upto:  # b falls inside this level: finish with finer pieces below
            break
    # middle and right: descend from the coarsest level
    for level in range(rank):
        step = strides[level]
        count = (b - pos) // step
        if count:
            boxes.append(box(pos, level, count))
            pos += count * step
    assert pos == b, (shape, a, b)
    return boxes


def row_major_tiles(shape: tuple[int, ...], volume: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of every row-major tile of `volume` tokens: ([B, rank, 2] boxes, [T + 1] box offsets per tile)."""
    total = math.prod(shape)
    boxes, starts = [], [0]
    for a in range(0, total, volume):
        pieces = flat_range_boxes(shape, a, min(a + volume, total))
        boxes.extend(pieces)
        starts.append(len(boxes))
    return np.array(boxes, dtype=np.int64).reshape(-1, len(shape), 2), np.array(starts, dtype=np.int64)
