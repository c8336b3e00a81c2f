"""How a number of tokens becomes a tile of the grid, and the untuned launch knobs: the rules the
kernels' default configs (codegen.config) and the simulator's defaults (simulator.ranking,
simulator.schedule) share, stated once. Plain integers in, tuples out: no torch, no codegen.

A tile is a box of the grid with a power-of-two extent per dimension (Triton's block shapes are
powers of two, so every factorization of a power-of-two volume is expressible).
"""

from __future__ import annotations

import math


def split(volume: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Spread a power-of-two `volume` of tokens round-robin over the dimensions (last first), each
    doubling only while it stays within the grid's extent.

    Near-cubic tiles keep the halo of a neighborhood small; what no dimension has room for goes to
    the last one (a grid smaller than the tile is padded there), so the tile always holds `volume`.
    """
    tile = [1] * len(shape)
    remaining = volume
    while remaining > 1:
        grew = False
        for d in reversed(range(len(shape))):
            if remaining > 1 and tile[d] * 2 <= max(shape[d], 1):
                tile[d] *= 2
                remaining //= 2
                grew = True
        if not grew:
            tile[-1] *= remaining
            remaining = 1
    return tuple(tile)


def block_tile(block: tuple[int, ...], volume: int, least: int = 16) -> tuple[int, ...] | None:
    """The largest power-of-two box of at most `volume` tokens dividing `block` (a top-k block: its
    kernels' tiles never straddle two blocks), cut from the outer dimensions first so the inner ones
    stay long (contiguous rows); None if it holds fewer than `least` tokens."""
    tile = [b & -b for b in block]  # the largest power of two dividing each extent
    for d in range(len(tile)):
        while math.prod(tile) > volume and tile[d] > 1:
            tile[d] //= 2
    return tuple(tile) if least <= math.prod(tile) <= volume else None


def clip(tile: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """`tile` no longer than the grid in any dimension (the grid's extent rounded up to a power of two)."""
    return tuple(min(t, 1 << max(0, (n - 1).bit_length())) for t, n in zip(tile, shape))


def forward_launch(block_m: int, head_dim: int = 128) -> tuple[int, int]:
    """(num_warps, num_stages) of the untuned forward for a query tile of `block_m` tokens: 8 warps
    for a 128-row tile above head_dim 64, else 4; three stages (of 64-token K/V tiles at head_dim
    128: 132 KB of shared memory, within an A100's 164 KB)."""
    return (8 if block_m >= 128 and head_dim > 64 else 4), 3


def topk_launch(tile: tuple[int, ...]) -> tuple[int, int]:
    """(num_warps, num_stages) of the untuned top-k forward, whose query and key tiles are equal:
    8 warps from 128 tokens on, else 4; two stages."""
    return (8 if math.prod(tile) >= 128 else 4), 2
