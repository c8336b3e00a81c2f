"""Who owns which frames, and which key frames each query chunk fetches from whom, when a grid is sharded.

Context parallelism shards a grid along its outermost dimension ("frames": the frames of a video, the
positions of a sequence). A rank owns one chunk of frames, or two under zig-zag sharding (chunks r
and 2R-1-r of 2R, which evens out a causal mask's work), and holds the q, k and v rows of its chunks
concatenated. Each query chunk then needs the key frames the analysis says its queries attend
(`maskdsl.analysis.halo.needed_frames`, exact), rounded out to whole key tiles so a kernel never reads a tile
that straddles a buffer's edge. Those frames are cut into *segments*, one kernel call each, whose
log-sum-exps are merged: the chunk's own frames first (no communication, so they hide the exchange
of the rest), then one segment per run of remote frames, capped at `max_segment_frames` so that a
global mask (sink, full, long causal) streams its keys through a bounded buffer instead of holding
all of them — a ring pass in all but the send order. A segment's rows come in *pieces*, one per
owning chunk, which is what travels between ranks.

Everything here is plain integers: the plan is identical on every rank, so every rank knows what to
send without asking. It is torch-free and lives at the bottom of the house.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from maskdsl.spec import ir
from maskdsl.analysis.halo import needed_frames, query_frames


@dataclass(frozen=True)
class Piece:
    """Key frames [first, end) that rank `source` holds in its chunk `chunk` (its local chunk index)."""

    source: int
    chunk: int
    frames: tuple[int, int]


@dataclass(frozen=True)
class Segment:
    """One kernel call: a contiguous key buffer of frames [first, end), assembled from its pieces in order,
    attended by the chunk's query frames [queries) (those that reach it, rounded out to whole chunk units)."""

    frames: tuple[int, int]
    pieces: tuple[Piece, ...]
    queries: tuple[int, int] = (0, 0)

    def remote(self, rank: int) -> bool:
        return any(p.source != rank for p in self.pieces)


@dataclass(frozen=True)
class ShardPlan:
    shape: tuple[int, ...]
    ranks: int
    zigzag: bool
    chunk_unit: int  # chunk boundaries fall on multiples of this many frames (every query and key tile)
    key_unit: int  # key buffers start and end on multiples of this (or at the last frame)
    chunks: tuple[tuple[tuple[int, int], ...], ...]  # per rank, its chunks' frames [first, end), local order
    segments: tuple[tuple[tuple[Segment, ...], ...], ...]  # per rank, per chunk: its segments, in run order

    @property
    def inner(self) -> int:
        """Token rows per frame."""
        return math.prod(self.shape[1:])

    def local_frames(self, r: int) -> int:
        return sum(b - a for a, b in self.chunks[r])

    def chunk_offset(self, r: int, c: int) -> int:
        """First local row of rank r's chunk c."""
        return sum(b - a for a, b in self.chunks[r][:c]) * self.inner

    def piece_rows(self, piece: Piece) -> tuple[int, int]:
        """The piece's rows [first, end) in its source's local tensors."""
        first = self.chunk_offset(piece.source, piece.chunk)
        a = self.chunks[piece.source][piece.chunk][0]
        return (first + (piece.frames[0] - a) * self.inner, first + (piece.frames[1] - a) * self.inner)

    def received_rows(self, r: int) -> int:
        """Key rows rank r receives for its forward (each remote piece once per segment that uses it)."""
        return sum((p.frames[1] - p.frames[0]) * self.inner
                   for segs in self.segments[r] for seg in segs for p in seg.pieces if p.source != r)

    def received_bytes(self, r: int, head_dim: int, kv_heads: int, batch: int = 1, dtype_bytes: int = 2) -> int:
        """Bytes of K and V rank r receives for one forward (its backward receives them again, and sends
        the same number of dK and dV bytes back)."""
        return 2 * self.received_rows(r) * head_dim * kv_heads * batch * dtype_bytes

    @cached_property
    def _steps(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        return tuple(tuple((c, i) for c, segs in enumerate(self.segments[r]) for i, seg in enumerate(segs)
                           if seg.remote(r)) for r in range(self.ranks))

    def steps(self, r: int) -> tuple[tuple[int, int], ...]:
        """(chunk, segment index) of rank r's remote segments, in the order it runs them (computed once:
        every forward and backward walks them)."""
        return self._steps[r]

    def step_count(self) -> int:
        return max((len(steps) for steps in self._steps), default=0)

    def sends(self, s: int, step: int) -> list[tuple[int, int, Piece]]:
        """(destination, index of the piece in its segment, piece) rank s sends at `step` of the exchange:
        every other rank's step-th remote segment's pieces that s owns, in destination then piece order (the
        receivers post the same order; the index tags the message)."""
        out = []
        for r in range(self.ranks):
            steps = self._steps[r]
            if r != s and step < len(steps):
                c, i = steps[step]
                out.extend((r, index, p) for index, p in enumerate(self.segments[r][c][i].pieces) if p.source == s)
        return out


def chunk_bounds(n0: int, pieces: int, unit: int) -> tuple[int, ...]:
    """Boundaries of `pieces` chunks of n0 frames, each a multiple of `unit` frames (the last takes the rest),
    as equal as that allows: the first chunks take the extra units."""
    units = -(-n0 // unit)
    if not 1 <= pieces <= units:
        raise ValueError(f"cannot cut {n0} frames into {pieces} chunks of whole {unit}-frame tiles "
                         f"(at most {units} chunks); use fewer ranks, or smaller tiles along dimension 0")
    base, extra = divmod(units, pieces)
    out = [0]
    for i in range(pieces):
        out.append(min(n0, out[-1] + (base + (i < extra)) * unit))
    return tuple(out)


def _chunks(n0: int, ranks: int, unit: int, zigzag: bool):
    """(each rank's chunks, every chunk as (first, end, rank, local index) in frame order, the largest chunk)."""
    pieces = 2 * ranks if zigzag else ranks
    bounds = chunk_bounds(n0, pieces, unit)
    spans = [(bounds[i], bounds[i + 1]) for i in range(pieces)]
    chunks = tuple(((spans[r], spans[pieces - 1 - r]) if zigzag else (spans[r],)) for r in range(ranks))
    owners = sorted((a, b, r, c) for r, cs in enumerate(chunks) for c, (a, b) in enumerate(cs))
    return chunks, owners, max(b - a for a, b in spans)


def shard_plan(expr: ir.MaskExpr, shape: tuple[int, ...], ranks: int, chunk_unit: int = 1, key_unit: int = 1,
               zigzag: bool = False, max_segment_frames: int | None = None, overlap: bool = True) -> ShardPlan:
    """The plan for `ranks` ranks. `chunk_unit` must be a multiple of `key_unit` (chunk edges are key-tile
    edges too, so cutting a run of key frames at an owner's edge keeps every segment tile-aligned).
    `max_segment_frames` caps a segment (default: twice the largest chunk, three times without overlap).

    `overlap=True` attends the own frames while the halo travels, at the price of one more kernel call
    (and a merge) per halo for the query tiles that reach it; `overlap=False` joins the halo and the own
    frames into one buffer (a copy) and one call over exactly the single-GPU tiles, after the exchange."""
    shape = tuple(int(n) for n in shape)
    n0 = shape[0]
    if chunk_unit % key_unit:
        raise ValueError(f"chunk_unit {chunk_unit} must be a multiple of key_unit {key_unit}")
    if ir.is_dynamic(expr):
        raise ValueError("top-k masks choose their keys from the data; shard them with every frame needed "
                         "(maskdsl.distributed does: one segment of the whole grid)")
    chunks, owners, largest = _chunks(n0, ranks, chunk_unit, zigzag)
    cap = max_segment_frames or (2 if overlap else 3) * largest
    segments = []
    for r in range(ranks):
        per_chunk = []
        for qa, qb in chunks[r]:
            need = needed_frames(expr, shape, (qa, qb))
            tiles = sorted({f // key_unit for f in need})
            segs = _segments(_runs(tiles, key_unit, n0), owners, r, cap, overlap)
            per_chunk.append(tuple(_with_queries(seg, expr, shape, (qa, qb), chunk_unit) for seg in segs))
        segments.append(tuple(per_chunk))
    return ShardPlan(shape, ranks, zigzag, chunk_unit, key_unit, chunks, tuple(segments))


def full_plan(shape: tuple[int, ...], ranks: int, chunk_unit: int = 1, zigzag: bool = False) -> ShardPlan:
    """Every chunk needs every frame, in one segment: what a top-k mask takes (its keys come from the data)."""
    shape = tuple(int(n) for n in shape)
    chunks, owners, _ = _chunks(shape[0], ranks, chunk_unit, zigzag)
    whole = tuple(Piece(r, c, (a, b)) for a, b, r, c in owners)
    segments = tuple(tuple((Segment((0, shape[0]), whole, chunk),) for chunk in chunks[r]) for r in range(ranks))
    return ShardPlan(shape, ranks, zigzag, chunk_unit, 1, chunks, segments)


def _with_queries(seg: Segment, expr, shape, chunk: tuple[int, int], unit: int) -> Segment:
    qa, qb = chunk
    hit = query_frames(expr, shape, seg.frames, chunk)
    if hit is None:  # cannot happen for a segment of needed frames; keep the whole chunk if it does
        return Segment(seg.frames, seg.pieces, chunk)
    first = qa + (hit[0] - qa) // unit * unit
    end = min(qb, qa + -(-(hit[1] - qa) // unit) * unit)
    return Segment(seg.frames, seg.pieces, (first, end))


def _runs(tiles: list[int], unit: int, n0: int) -> list[tuple[int, int]]:
    """Maximal runs of consecutive key tiles, as frame ranges [first, end)."""
    runs = []
    for t in tiles:
        if runs and runs[-1][1] == t:
            runs[-1][1] = t + 1
        else:
            runs.append([t, t + 1])
    return [(a * unit, min(b * unit, n0)) for a, b in runs]


def _segments(runs, owners, rank: int, cap: int, overlap: bool = True):
    """Cut runs into pieces at owners' edges; the rank's own pieces are segments of their own (they need
    no exchange), consecutive remote pieces join while the segment stays within `cap` frames. Without
    `overlap`, any consecutive pieces join (own frames included) within `cap`."""
    out: list[list] = []  # [first, end, pieces, remote]
    for a, b in runs:
        for oa, ob, r, c in owners:
            lo, hi = max(a, oa), min(b, ob)
            if lo >= hi:
                continue
            piece = Piece(r, c, (lo, hi))
            remote = r != rank
            last = out[-1] if out else None
            if not overlap and last and last[1] == lo and hi - last[0] <= cap:
                last[1] = hi
                last[2].append(piece)
                last[3] = last[3] or remote
            elif (last and last[3] and remote and last[1] == lo and hi - last[0] <= cap):
                last[1] = hi
                last[2].append(piece)
            elif last and not last[3] and not remote and last[1] == lo:
                last[1] = hi
                last[2].append(piece)
            else:
                out.append([lo, hi, [piece], remote])
    local = [Segment((a, b), tuple(p)) for a, b, p, remote in out if not remote]
    far = [Segment((a, b), tuple(p)) for a, b, p, remote in out if remote]
    return local + far
