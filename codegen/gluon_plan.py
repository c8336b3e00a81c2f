"""What the Gluon forward (codegen.gluon_fwd) can run: which masks (with each query tile's key-tile
box), which tensors, and the per-device tables a launch reads. Nothing here imports Gluon, so the
rule is checked (and tested) on machines where the kernel cannot run.

The Gluon kernel has no predicate at all: a query tile (a box of the grid, 128 tokens) walks a box
of key tiles [lo_d, hi_d) per dimension (128 tokens each), every one of them seen entirely by every
row. So a mask qualifies when, at those tiles, (1) every visited tile of every query tile is full
and (2) a query tile's visited key tiles form one box. Perfectly block-sparse masks do (dense,
block(n), neighborhood(window=w, stride=s) with tiles dividing s and w, unions of nested blocks); a
plain sliding window or causal mask does not (its diagonal tiles are partial): on a 1-D token order
those take the kernel's predicated mode (codegen.gluon_runs), elsewhere the Triton template.

Which tiles: on a 1-D token order (every dimension but the last of extent 1) the kernel's own
(1, .., 128); on a multi-dimensional grid the compiled config's, when each is 128 tokens (the
tile shape decides whether a mask is block-sparse, and the config is what was tuned for it).

The boxes come from the exact integer row bounds of the analysis' product terms
(`maskdsl.intervals.evaluate`, tabulated per dimension by `maskdsl.transpose.query_tile_ranges`),
the same numbers the Triton template and the backward's tables are built from. One product term is
a box per query tile because a tile pair is visited (full) exactly when it is in every dimension. A
union is accepted when each term's visited tiles are full for that term (then they are full for the
union) and, per query tile, the terms' boxes agree on every dimension but the last and their runs
there merge into one; a tile that only the union fills is refused, which costs speed, never
correctness. Layouts with dilation are refused (a dilation group is not a box of memory), as are
grids of more than 3 dimensions (the copy engine's boxes have 5: batch x head, 3, head_dim).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from math import prod

import numpy as np
import torch

from maskdsl.codegen.checks import tma_aligned
from maskdsl.codegen.plan import KernelPlan
from maskdsl.intervals import SymRel, evaluate
from maskdsl.transpose import query_tile_ranges

BLOCK_M = 128
BLOCK_N = 128
HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)
RANK = 3  # the kernel's grid rank: smaller grids get leading dimensions of extent 1
# Work items (query tile x head) visiting at most SHORT_ITEM key tiles on average run up to MAX_PER to a
# program (codegen.gluon_fwd: the next item's Q and K/V load under the current one). Measured on an H100
# (docs/BENCHMARKS.md): 4-tile items (3-D block(2, 16, 16)) and 16-tile items (one head at 32k) gain 2-7%;
# items of 50+ tiles and the predicated modes do not (dense: PER 2 lost 8-11%).
SHORT_ITEM = 16
MAX_PER = 4


@dataclass(frozen=True)
class TileRanges:
    """Per query tile t (row-major over the query-tile grid) the key-tile box [lo[t, d], hi[t, d]) it
    visits in each of the RANK dimensions (empty in one dimension: none), or why the mask does not qualify.

    `shape`, `q_tile`, `kv_tile` are padded at the front to RANK dimensions; `reason` is None when the
    Gluon kernel can run the mask, and then lo/hi are int32 [q tiles, RANK].
    """

    lo: np.ndarray
    hi: np.ndarray
    reason: str | None = None
    shape: tuple[int, ...] = ()
    q_tile: tuple[int, ...] = ()
    kv_tile: tuple[int, ...] = ()
    bounds = None  # whole tiles only: no per-row predicate (codegen.gluon_runs.RunRanges has one)
    long = 0  # dispatched in tile order
    mode = "whole"  # the kernel's mode: "whole", "runs" (codegen.gluon_runs) or "boxes" (codegen.gluon_boxes)

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def busy(self) -> np.ndarray:
        """Indices of the query tiles that visit at least one key tile (the kernel's grid), ascending."""
        return np.nonzero((self.hi > self.lo).all(1))[0].astype(np.int32)

    @property
    def idle(self) -> np.ndarray:
        """Indices of the query tiles that visit nothing: their rows output 0 and LSE -inf."""
        return np.nonzero(~(self.hi > self.lo).all(1))[0].astype(np.int32)

    @property
    def q_tiles(self) -> tuple[int, ...]:
        """Query tiles per dimension (the last one ragged where the tile does not divide the extent)."""
        return tuple(-(-n // t) for n, t in zip(self.shape, self.q_tile))

    def coords(self, tiles: np.ndarray) -> np.ndarray:
        """[len(tiles), RANK] query-tile coordinates of flat tile indices."""
        return np.stack(np.unravel_index(tiles, self.q_tiles), axis=1).astype(np.int64)

    def rows(self, tiles: np.ndarray) -> np.ndarray:
        """Flat (row-major) token indices of the rows of these query tiles, tile by tile (a ragged
        tile's rows past the grid left out)."""
        offsets = np.stack(np.unravel_index(np.arange(prod(self.q_tile)), self.q_tile), axis=1)
        coords = (self.coords(tiles)[:, None, :] * np.array(self.q_tile) + offsets[None]).reshape(-1, RANK)
        coords = coords[(coords < np.array(self.shape)).all(1)]
        return np.ravel_multi_index(tuple(np.moveaxis(coords, 1, 0)), self.shape).astype(np.int64)


def _refused(reason: str) -> TileRanges:
    empty = np.zeros((0, RANK), np.int32)
    return TileRanges(empty, empty, reason)


def pad_rank(t) -> tuple[int, ...]:
    return (1,) * (RANK - len(t)) + tuple(t)


def kernel_tiles(plan: KernelPlan) -> tuple[tuple[int, ...], tuple[int, ...]] | str:
    """The (query, key) tiles the kernel runs the plan's mask with, or why none (module docstring)."""
    if all(e == 1 for e in plan.shape[:-1]):
        return (1,) * (plan.rank - 1) + (BLOCK_M,), (1,) * (plan.rank - 1) + (BLOCK_N,)
    cfg = plan.config
    if prod(cfg.q_tile) != BLOCK_M or prod(cfg.kv_tile) != BLOCK_N:
        return (f"config {cfg.key()}: the kernel's query and key tiles are {BLOCK_M} and {BLOCK_N} tokens "
                f"(choose tiles such as q2x8x8_k2x8x8)")
    return tuple(cfg.q_tile), tuple(cfg.kv_tile)


def layout_tiles(plan: KernelPlan, q_tile=None, kv_tile=None) -> tuple[tuple[int, ...], tuple[int, ...]] | str:
    """(query tile, key tile) of a launch, `kernel_tiles` unless given, or why the grid's layout keeps
    every mode of the kernel away (more than RANK dimensions, dilation)."""
    if q_tile is None:
        tiles = kernel_tiles(plan)
        if isinstance(tiles, str):
            return tiles
        q_tile, kv_tile = tiles
    if plan.rank > RANK:
        return f"grid {plan.shape}: the kernel takes at most {RANK} dimensions"
    if any(d.dilation != 1 for d in plan.dims):
        return "dilated layout: a tile is not a box of memory"
    return tuple(q_tile), tuple(kv_tile)


def tile_ranges(plan: KernelPlan, q_tile=None, kv_tile=None) -> TileRanges:
    """The key-tile box of every query tile of the plan's mask (module docstring); tiles default to
    `kernel_tiles`, a test passes its own."""
    tiles = layout_tiles(plan, q_tile, kv_tile)
    if isinstance(tiles, str):
        return _refused(tiles)
    q_tile, kv_tile = tiles
    for n, qt, kt in zip(plan.shape, q_tile, kv_tile):
        if n % qt or n % kt:
            return _refused(f"grid {plan.shape} is not a multiple of the tiles {tuple(q_tile)} x {tuple(kv_tile)}")
    shape, q_tile, kv_tile = pad_rank(plan.shape), pad_rank(q_tile), pad_rank(kv_tile)
    boxes = []
    for term in plan.terms:
        box = _term_box(term, shape, q_tile, kv_tile)
        if isinstance(box, str):
            return _refused(box)
        boxes.append(box)
    lo, hi = _merge(boxes, prod(-(-n // t) for n, t in zip(shape, q_tile)))
    return (_refused(lo) if isinstance(lo, str)
            else TileRanges(lo.astype(np.int32), hi.astype(np.int32), None, shape, q_tile, kv_tile))


def _term_box(term, shape, q_tile, kv_tile):
    """(lo, hi) [q tiles, RANK] of one product term (lo == hi in every dimension where it sees nothing),
    or why one of its visited tiles is partial."""
    los, his, exact = [], [], []
    for td, n, qt, kt in zip((None,) * (RANK - len(term)) + tuple(term), shape, q_tile, kv_tile):
        if td is None:  # a padding dimension: one tile, seen entirely
            los.append(np.zeros(1, np.int64)), his.append(np.ones(1, np.int64)), exact.append(np.ones(1, bool))
            continue
        if td.dilation != 1:
            return "a dilated (strided) term: none of its tiles is full"
        tab = query_tile_ranges(*evaluate(SymRel(1, td.lo, td.hi, td.qa, td.qb), n), 1, qt, kt)  # inclusive
        seen = tab[:, 0] <= tab[:, 1]
        los.append(np.where(seen, tab[:, 0], 0)), his.append(np.where(seen, tab[:, 1] + 1, 0))
        exact.append(~seen | ((tab[:, 0] == tab[:, 2]) & (tab[:, 1] == tab[:, 3])))
    grid = np.meshgrid(*[np.arange(len(x)) for x in los], indexing="ij")
    lo = np.stack([los[d][grid[d]].reshape(-1) for d in range(RANK)], axis=1)
    hi = np.stack([his[d][grid[d]].reshape(-1) for d in range(RANK)], axis=1)
    full = np.stack([exact[d][grid[d]].reshape(-1) for d in range(RANK)], axis=1).all(1)
    busy = (hi > lo).all(1)
    if (busy & ~full).any():
        t = int(np.nonzero(busy & ~full)[0][0])
        return f"query tile {t} visits partially seen key tiles (the kernel has no predicate)"
    return np.where(busy[:, None], lo, 0), np.where(busy[:, None], hi, 0)


def _merge(boxes: list, q_tiles: int):
    """One box per query tile from every term's boxes, or a refusal where their union is not one box."""
    if not boxes:
        zero = np.zeros((q_tiles, RANK), np.int64)
        return zero, zero.copy()
    lo, hi = boxes[0]
    lo, hi = lo.copy(), hi.copy()
    for t in range(q_tiles) if len(boxes) > 1 else ():
        used = [(b_lo[t], b_hi[t]) for b_lo, b_hi in boxes if (b_hi[t] > b_lo[t]).all()]
        if len(used) < 2:
            lo[t], hi[t] = used[0] if used else (0, 0)
            continue
        if any((a[:-1] != used[0][0][:-1]).any() or (b[:-1] != used[0][1][:-1]).any() for a, b in used):
            return f"query tile {t}: the terms' key-tile boxes differ before the last dimension (not one box)", None
        reach = min(a[-1] for a, _ in used)
        for a, b in sorted((int(a[-1]), int(b[-1])) for a, b in used):
            if a > reach:
                return f"query tile {t} visits key tiles in more than one run (gap at tile {reach})", None
            reach = max(reach, b)
        lo[t], hi[t] = used[0][0], used[0][1]
        lo[t, -1], hi[t, -1] = min(a[-1] for a, _ in used), reach
    return lo, hi


def box_strides(t: torch.Tensor, grid: tuple[int, ...]) -> list[int] | None:
    """Element strides of t as [batch x heads, *grid, head_dim] (grid padded to RANK dimensions)
    when the copy engine can address it so, else None.

    The rule of `compiled.tma_descriptors`: unit last stride, 16-byte aligned base and strides, and
    batch folding into heads, so the kernel addresses a (batch, head) with one coordinate.
    """
    batch, heads, _, _ = t.shape
    sb, sh, sl, sd = t.stride()
    grid = pad_rank(grid)
    inner = [sl * prod(grid[d + 1:]) for d in range(RANK)]
    strides = [sh, *inner, sd]
    if (batch > 1 and sb != heads * sh) or not tma_aligned(t, strides):
        return None
    return strides


def tensor_blocker(q, k, v, out, lse=None, grid: tuple[int, ...] | None = None) -> str | None:
    """Why the Gluon forward cannot take these tensors (mask aside), or None. Cheapest checks first.

    The kernel writes LSE as [batch x heads x tokens] float32; None stands for the op's own.
    """
    return device_blocker(q.device) or layout_blocker(q, k, v, out, lse, grid)


def device_blocker(device: torch.device) -> str | None:
    """Why the Gluon forward cannot run on `device` at all (tensors aside), or None: the switch, the
    interpreter, a GPU that is not Hopper. The untuned default asks it too (autotune.space)."""
    if os.environ.get("MASKDSL_GLUON") == "0":
        return "MASKDSL_GLUON=0"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "Triton's interpreter runs Triton kernels only"
    if device.type != "cuda":
        return f"tensors on {device.type}, not CUDA"
    if _capability(device) != 9:
        return f"compute capability {_capability(device)}.x; the kernel is Hopper's (9.x)"
    return None


def layout_blocker(q, k, v, out, lse=None, grid: tuple[int, ...] | None = None) -> str | None:
    """The device-independent half of `tensor_blocker`: dtype, head_dim and memory layout
    (`grid`, the mask's layout shape, defaults to a 1-D token order)."""
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype}; the kernel takes float16 and bfloat16"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head_dim {q.shape[-1]}; the kernel takes {HEAD_DIMS}"
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        if box_strides(t, grid or (t.shape[2],)) is None:
            return f"{name} (strides {t.stride()}) is not a copy-engine box [batch x heads, grid, head_dim]"
    if lse is not None and not (lse.is_contiguous() and lse.dtype == torch.float32):
        return "lse is not a contiguous float32 tensor"
    return None


_PROPERTIES: dict[torch.device, object] = {}


def _properties(device: torch.device):
    """torch.cuda.get_device_properties, cached: a one-head launch is host-bound."""
    if device not in _PROPERTIES:
        _PROPERTIES[device] = torch.cuda.get_device_properties(device)
    return _PROPERTIES[device]


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device."""
    return _properties(device).multi_processor_count


def _capability(device: torch.device) -> int:
    return _properties(device).major


class GluonSchedule:
    """A mask's tile boxes (or, predicated, its runs: codegen.gluon_runs) as the kernel reads them,
    copied to each device once.

    `table`: int32 rows in tile order, the kernel's grid (query-tile coordinates, then lo, hi per
    dimension; predicated: a second run and a flag too); `idle_rows`: int64 token indices of the
    tiles that visit nothing, filled with 0 / -inf apart; `bounds`: the predicated mode's per-row key
    intervals, else None.
    """

    def __init__(self, ranges):
        self.ranges = ranges
        self.bounds = ranges.bounds if ranges.ok else None
        self.boxes = ranges.ok and ranges.mode == "boxes"  # codegen.gluon_boxes: head_dim 128 only
        if not ranges.ok:
            self.table = np.zeros((0, 3 * RANK), np.int32)
            self.idle_rows = np.zeros(0, np.int64)
        elif self.bounds is not None:
            self.table = ranges.table
            self.idle_rows = ranges.rows(ranges.idle)
        else:
            busy = ranges.busy
            bounds = np.stack([ranges.lo[busy], ranges.hi[busy]], axis=2).reshape(len(busy), 2 * RANK)
            self.table = np.concatenate([ranges.coords(busy), bounds], axis=1).astype(np.int32)
            self.idle_rows = ranges.rows(ranges.idle)
        self._on: dict[torch.device, tuple] = {}
        self._segments: dict[tuple, tuple] = {}
        # whole tiles whose rows visit at most SHORT_ITEM key tiles on average (items_per_program)
        whole = self.bounds is None and len(self.table) > 0
        extents = self.table[:, RANK + 1:3 * RANK:2].astype(np.int64) - self.table[:, RANK:3 * RANK:2]
        self._short = whole and float(extents.prod(axis=1).mean()) <= SHORT_ITEM

    def items_per_program(self, items: int, sms: int) -> int:
        """Work items per Gluon program for `items` (table rows x batch x heads) on `sms` multiprocessors:
        1 unless every tile is whole and the items are short (`SHORT_ITEM` key tiles on average); then
        enough to fill the GPU once (one head at 32k: 256 items, 2 a program) up to `MAX_PER`.
        MASKDSL_GLUON_PER=k forces k (measurements)."""
        forced = os.environ.get("MASKDSL_GLUON_PER")
        if forced:
            return max(1, int(forced))
        if not self._short:
            return 1
        return max(1, min(MAX_PER, -(-items // sms)))

    def on(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(table, idle rows, bounds or None) on `device`."""
        device = torch.device(device)
        if device not in self._on:
            bounds = None if self.bounds is None else torch.from_numpy(self.bounds).to(device)
            self._on[device] = (torch.from_numpy(self.table).to(device), torch.from_numpy(self.idle_rows).to(device),
                                bounds)
        return self._on[device]

    def segment(self, q_rows: tuple[int, int], k_rows: tuple[int, int], device):
        """(table, idle rows, bounds, ranges) on `device` of rows [qa, qb) over a buffer of keys [ka, kb),
        predicated 1-D mode only (codegen.gluon_runs.segment_ranges); ranges is refused where the cut
        schedule does not qualify. Cached: a context-parallel rank runs the same few segments each step."""
        from maskdsl.codegen.gluon_runs import segment_ranges

        key = (q_rows, k_rows, torch.device(device))
        if key not in self._segments:
            r = segment_ranges(self.ranges, q_rows, k_rows)
            if r.ok:
                on = [torch.from_numpy(x).to(device) for x in (r.table, r.rows(r.idle), r.bounds)]
                self._segments[key] = (*on, r)
            else:
                self._segments[key] = (None, None, None, r)
        return self._segments[key]
