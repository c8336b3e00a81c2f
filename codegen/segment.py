"""One rank's share of a grid sharded along dimension 0 (context parallelism, issue 16).

A rank holds a query chunk, frames [q0, q1) of dimension 0, and receives key buffers, frames
[k0, k1). A segment is the attention of the chunk's queries over one buffer's keys, with the mask
evaluated in the grid's global coordinates; the caller merges segments by log-sum-exp. The static
kernels take the four frame numbers as runtime ints: rows are addressed relative to the chunk and
the buffer, and every key-tile range along dimension 0 is clamped to the buffer's tiles (the
backward also clamps its query-tile runs to the chunk's). The whole grid is the segment
(0, n0) x (0, n0), so the ordinary launch runs the same code with the same bits.

Frames must lie on tile boundaries along dimension 0 (a tile is never split between ranks: its
rows are all inside or all outside), which needs dimension 0 undilated: a dilation group's rows are
not a contiguous run of frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """Query frames [q0, q1) and key frames [k0, k1) of dimension 0; `inner` tokens per frame."""

    q0: int
    q1: int
    k0: int
    k1: int
    inner: int

    @property
    def q_rows(self) -> int:
        return (self.q1 - self.q0) * self.inner

    @property
    def k_rows(self) -> int:
        return (self.k1 - self.k0) * self.inner

    @property
    def args(self) -> tuple[int, int, int, int]:
        """The kernels' runtime arguments q_frame0, q_frame1, k_frame0, k_frame1."""
        return self.q0, self.q1, self.k0, self.k1

    @property
    def q_frames(self) -> tuple[int, int]:
        return self.q0, self.q1

    @property
    def k_frames(self) -> tuple[int, int]:
        return self.k0, self.k1


def tile_run(frames: tuple[int, int], tile: int, tiles0: int, tiles: int, n0: int) -> range:
    """The program ids of the tiles of `frames`, for a kernel with `tiles` tiles in all, `tiles0` of
    them along dimension 0, each `tile` frames long. Dimension 0 is the slowest in a tile's index, so
    they are one run; the grid's end takes every tile left (a dilated dimension 0 has more tiles
    than n0 / tile, but then only the whole grid is a segment)."""
    per = tiles // tiles0
    stop = tiles0 if frames[1] == n0 else frames[1] // tile
    return range(frames[0] // tile * per, stop * per)


def whole(shape: tuple[int, ...]) -> Segment:
    """The whole grid: what the ordinary launch runs."""
    return Segment(0, shape[0], 0, shape[0], math.prod(shape[1:]))


def segment(shape: tuple[int, ...], dilation0: int, q_frames, k_frames, q_tile: int, kv_tile: int) -> Segment:
    """Check a chunk and a buffer against the grid and the tiles along dimension 0 (every kernel's
    that will run them: pass the lcm when several do), or say which argument is wrong and what would do."""
    if dilation0 != 1:
        raise ValueError(f"dimension 0 of grid {tuple(shape)} is dilated ({dilation0}) in this mask's layout: its "
                         "dilation groups are not runs of frames; shard an undilated outermost dimension")
    n0 = shape[0]
    q = _frames("q_frames", q_frames, n0, q_tile, "query")
    k = _frames("k_frames", k_frames, n0, kv_tile, "key")
    return Segment(*q, *k, math.prod(shape[1:]))


def _frames(name: str, frames, n0: int, tile: int, kind: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in frames)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (first, stop) of frames of dimension 0; got {frames!r}") from None
    if not 0 <= a < b <= n0:
        raise ValueError(f"{name}={frames!r} is not a non-empty range of frames within [0, {n0}): "
                         f"need 0 <= first < stop <= {n0}")
    if a % tile:
        raise ValueError(f"{name}={frames!r}: first frame {a} is not on a {kind}-tile boundary (the {kind} tile "
                         f"spans {tile} frames of dimension 0); use {_near(a, tile, n0)}")
    if b % tile and b != n0:
        raise ValueError(f"{name}={frames!r}: stop frame {b} is not on a {kind}-tile boundary (the {kind} tile "
                         f"spans {tile} frames of dimension 0) nor the grid's end {n0}; use {_near(b, tile, n0)}")
    return a, b


def _near(frame: int, tile: int, n0: int) -> str:
    """The valid boundaries around `frame`: the multiples of `tile` either side, and the grid's end."""
    below, above = frame // tile * tile, min(-(-frame // tile) * tile, n0)
    return " or ".join(str(x) for x in sorted({below, above}))
