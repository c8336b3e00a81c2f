"""Where tiles sit in the token order: the layout conventions the kernels use, stated once.

Two layouts, matching what codegen runs:

* **tile-major** (``permute=True``, GNA's token permutation): a tile is a box of the grid. In a
  dimension with dilation ``d`` (``maskdsl.analysis.counts.layout_dilation``) the coordinates are first
  laid out dilation-group-major: group ``g = c mod d`` occupies positions
  ``[off_g, off_g + len_g)`` with ``len_g = ceil((n - g) / d)``, and tiles are cut per group, so a
  tile never straddles two groups: the tile edges are ``off_g + k*T`` clipped to the group's end.
  Tiles are numbered row-major over the per-dimension tile indices (dimension 0 slowest), and in
  one dimension group 0's tiles come first, then group 1's, and so on.
* **row-major** (``permute=False``): tokens keep their order; tile ``t`` is the flat range
  ``[t*V, min((t+1)*V, L))`` with ``V = prod(tile)``; the last one may be ragged. A flat range is
  a union of at most ``2*rank - 1`` disjoint boxes (``maskdsl.analysis.boxes.flat_range_boxes``), which is how it is counted.
"""

from __future__ import annotations

import math
from itertools import product

import numpy as np

from maskdsl.analysis.tiles import split

MIN_TILE_TOKENS = 16
MAX_TILE_TOKENS = 256


def check_tile(tile, shape: tuple[int, ...], name: str) -> tuple[int, ...]:
    """The tile as a tuple of ints, or a ValueError naming the argument and saying how to fix it."""
    rank = len(shape)
    if isinstance(tile, (int, np.integer)) and not isinstance(tile, bool):
        tile = (int(tile),)
    try:
        values = tuple(tile)
    except TypeError:
        raise ValueError(f"{name} must be a tuple of {rank} positive integers (one per grid dimension), "
                         f"got {tile!r}; hint: {name}={split(128, shape)}") from None
    if len(values) != rank:
        raise ValueError(f"{name} has {len(values)} entries but the grid {shape} has {rank} dimension(s); "
                         f"hint: give one tile extent per dimension, e.g. {name}={split(128, shape)}")
    out = []
    for d, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"{name}[{d}] = {v!r} is not a positive integer; hint: tile extents are token counts "
                             f"per dimension, e.g. {name}={split(128, shape)}")
        out.append(int(v))
    return tuple(out)


def group_offsets(n: int, d: int) -> np.ndarray:
    """[d + 1] start positions of the dilation groups in the group-major order (the last is n)."""
    lengths = [(n - g + d - 1) // d for g in range(d)]
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def dim_intervals(n: int, tile: int, dilation: int = 1) -> np.ndarray:
    """[T, 2] (start, stop) of one dimension's tiles in the tile-major (group-major) positions."""
    offsets = group_offsets(n, dilation)
    spans = []
    for g in range(dilation):
        start, stop = int(offsets[g]), int(offsets[g + 1])
        edges = np.arange(start, stop, tile, dtype=np.int64)
        spans.append(np.stack([edges, np.minimum(edges + tile, stop)], axis=1))
    return np.concatenate(spans) if spans else np.zeros((0, 2), np.int64)


def permuted_boxes(per_dim: list[np.ndarray]) -> np.ndarray:
    """[N, rank, 2]: the Cartesian product of per-dimension intervals, row-major over tile indices."""
    grids = np.meshgrid(*[np.arange(len(iv)) for iv in per_dim], indexing="ij")
    idx = [g.reshape(-1) for g in grids]
    return np.stack([iv[i] for iv, i in zip(per_dim, idx)], axis=1)


def candidate_tiles(shape: tuple[int, ...], min_tokens: int = MIN_TILE_TOKENS,
                    max_tokens: int = MAX_TILE_TOKENS) -> list[tuple[int, ...]]:
    """Tile shapes a kernel can use: power-of-two extents, volume in [min_tokens, max_tokens].

    Extents stop at the next power of two at or above the grid extent: anything larger is the
    same tiling of that dimension with more padding.
    """
    caps = [1 << max(0, (n - 1).bit_length()) for n in shape]
    options = [[1 << e for e in range(cap.bit_length())] for cap in caps]
    out = [t for t in product(*options) if min_tokens <= math.prod(t) <= max_tokens]
    return sorted(out, key=lambda t: (math.prod(t), t))
