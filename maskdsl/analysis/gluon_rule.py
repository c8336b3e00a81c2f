"""Which mode of Hopper's Gluon forward runs a mask, and the per-query-tile data that mode reads.

The one rule: codegen builds the kernel's tables from what `gluon_ranges` returns
(codegen.gluon_plan.GluonSchedule) and the simulator costs the same answer (simulator.gluon), so a
prediction is always for the kernel that runs. Both hand in the analysis' product terms as exact
per-row key bounds (`maskdsl.analysis.counts.Rel1D`: `num_products(expr, shape)[i].num`, or a codegen
plan's terms evaluated), the same numbers the Triton template and the backward's tables come from.

The kernel walks 128-token query tiles, each over 128-token key tiles. Its tiles: on a 1-D token
order (every dimension but the last of extent 1) its own (1, .., 128) whatever the config; on a
grid the config's, when each holds 128 tokens (the tile shape decides which key tiles are full, and
the config is what was tuned). Modes, in order of preference:

* "whole": no predicate. Every visited tile of every query tile is full, and a query tile's
  visited key tiles form one box of the key-tile grid. A product term is a box per query tile
  (a tile pair is visited, or full, exactly when it is in every dimension); a union qualifies when
  each term's visited tiles are full for that term (then for the union) and per query tile the
  terms' boxes agree before the last dimension and their runs there merge into one. A tile only
  the union fills is refused: that costs speed, never correctness. Dense, block(n), GNA with tiles
  dividing its window and stride, unions of nested blocks.
* "runs" (1-D token orders): each row's keys at most `row_runs.SLOTS` intervals, each query tile's
  key tiles at most `row_runs.RUNS` runs; the kernel masks a run's edge tiles (every tile where the
  query tile's flag says so). Causal, sliding windows, sinks, ragged ends (maskdsl.analysis.row_runs).
* "boxes" (grids, head_dim 128): one product term, so each row's keys are a box of per-dimension
  intervals; a key tile is full where it is in every dimension, the others are masked by three
  interval tests per score. NA, GNA off the tiles, ragged extents.

Refused everywhere: grids of more than RANK dimensions (the copy engine's boxes have 5: batch x
head, 3, head_dim), dilated layouts (a dilation group is not a box of memory), row-major tiles on a
grid, and the head_dims and dtypes the kernel was not built for. head_dim and dtype may be left out
(None) where the tensors are not known yet: the launch checks them then.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import Callable, Sequence

import numpy as np

from maskdsl.analysis.row_runs import BLOCK, EMPTY, dispatch_order, row_intervals, tile_runs
from maskdsl.analysis.tile_table import MODES, PREDICATED, RANK
from maskdsl.analysis.transpose import query_tile_ranges
from maskdsl.spec import ir

TILE = BLOCK  # tokens of the kernel's query tile and of its key tile (the runs rule's block)
GLUON_HEAD_DIMS = (64, 128)  # head_dims the kernel is compiled for
# The box predicate's compares do not shrink with head_dim while the tile's MMAs halve: at 64 a mask
# whose tiles are mostly masked runs slower than the template (docs/BENCHMARKS.md).
BOX_HEAD_DIMS = (128,)
GLUON_DTYPES = ("float16", "bfloat16")  # by torch's name; `dtype_name` maps the spec's fp16 / bf16
_ALIASES = {**ir.TORCH_DTYPE_NAMES, "half": "float16"}


def dtype_name(dtype) -> str:
    """torch's name of a dtype given as a torch dtype, its name, or the spec's short name (fp16, bf16)."""
    name = str(dtype).lower().removeprefix("torch.")
    return _ALIASES.get(name, name)


def pad_rank(t: Sequence[int]) -> tuple[int, ...]:
    """A shape or tile padded at the front to RANK dimensions (extent 1)."""
    return (1,) * (RANK - len(t)) + tuple(int(x) for x in t)


def one_d(shape: Sequence[int]) -> bool:
    """A 1-D token order: every dimension but the last of extent 1."""
    return all(n == 1 for n in shape[:-1])


def kernel_tiles(shape, q_tile, kv_tile) -> tuple[tuple[int, ...], tuple[int, ...]] | str:
    """The (query, key) tiles the kernel runs a config's tiles with (module docstring), or why none."""
    if one_d(shape):
        one = (1,) * (len(shape) - 1) + (TILE,)
        return one, one
    if prod(q_tile) != TILE or prod(kv_tile) != TILE:
        return (f"config q{tuple(q_tile)} k{tuple(kv_tile)}: the kernel's query and key tiles are {TILE} tokens "
                f"(choose tiles such as q2x8x8_k2x8x8)")
    return tuple(q_tile), tuple(kv_tile)


@dataclass(frozen=True, eq=False)
class GluonRanges:
    """The Gluon forward's schedule of one mask at one pair of tiles, or why it has none.

    `mode`: one of tile_table.MODES, None when refused (`reason` says why). `shape`, `q_tile`,
    `kv_tile`: padded to RANK. Per query tile t (row-major over the query-tile grid):
    `lo[t], hi[t]` the key-tile box [lo, hi) it visits per dimension ("runs": its first run in the
    last dimension, [0, 1) before); 0, 0 where it visits nothing. Per mode, the rest is None:

    * "boxes": `full_lo`, `full_hi` the key tiles every row of t sees whole, per dimension;
      `bounds` int32 2 x (n0 + n1 + n2): per dimension the rows' first keys then their last keys
      (inclusive; 1, 0 where a coordinate sees nothing).
    * "runs": `run2` int32 [q tiles, 2] the second run [lo, hi) (0, 0: none), `flag` bool whether
      every tile of t is masked, `bounds` int32 [SLOTS, 2, rows] each row's key intervals
      (inclusive; row_runs.EMPTY unused), `keys` the key extent.

    `order`: the busy query tiles in the kernel's dispatch order, of which the first `long` run
    ahead of every head's rest (row_runs.dispatch_order; tile order but for "runs").

    The verdict is computed first and the arrays once, when first read: the simulator asks for
    verdicts at many tile pairs and reads none of them.
    """

    mode: str | None
    reason: str | None = None
    shape: tuple[int, ...] = ()
    q_tile: tuple[int, ...] = ()
    kv_tile: tuple[int, ...] = ()
    keys: int = 0
    long: int = 0
    data: dict = field(default_factory=dict, repr=False)  # the arrays by name, as far as computed
    build: Callable[[], dict] | None = field(default=None, repr=False)  # computes the rest

    def _get(self, name: str):
        if name not in self.data and self.build is not None:
            self.data.update(self.build())
        return self.data.get(name)

    lo = property(lambda self: self._get("lo"))
    hi = property(lambda self: self._get("hi"))
    full_lo = property(lambda self: self._get("full_lo"))
    full_hi = property(lambda self: self._get("full_hi"))
    run2 = property(lambda self: self._get("run2"))
    flag = property(lambda self: self._get("flag"))
    bounds = property(lambda self: self._get("bounds"))

    @property
    def order(self) -> np.ndarray:
        order = self._get("order")
        return self.busy if order is None else order

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def predicated(self) -> bool:
        return self.mode in PREDICATED

    @property
    def busy(self) -> np.ndarray:
        """The query tiles that visit at least one key tile (the kernel's grid), ascending."""
        return np.nonzero((self.hi > self.lo).all(1))[0]

    @property
    def idle(self) -> np.ndarray:
        """The query tiles that visit nothing: their rows output 0 and LSE -inf."""
        return np.nonzero(~(self.hi > self.lo).all(1))[0]

    @property
    def q_tiles(self) -> tuple[int, ...]:
        """Query tiles per dimension (the last one ragged where the tile does not divide the extent)."""
        return tuple(-(-n // t) for n, t in zip(self.shape, self.q_tile))

    def work(self, tiles: np.ndarray) -> np.ndarray:
        """Key tiles each of these query tiles walks."""
        n = np.prod(self.hi[tiles].astype(np.int64) - self.lo[tiles], axis=1)
        return n if self.run2 is None else n + (self.run2[tiles, 1] - self.run2[tiles, 0])

    def coords(self, tiles: np.ndarray) -> np.ndarray:
        """[len(tiles), RANK] query-tile coordinates of flat tile indices."""
        return np.stack(np.unravel_index(np.asarray(tiles, np.int64), self.q_tiles), axis=1).astype(np.int64)

    def rows(self, tiles: np.ndarray) -> np.ndarray:
        """Flat (row-major) token indices of the rows of these query tiles, tile by tile (a ragged
        tile's rows past the grid left out)."""
        offsets = np.stack(np.unravel_index(np.arange(prod(self.q_tile)), self.q_tile), axis=1)
        coords = (self.coords(tiles)[:, None, :] * np.array(self.q_tile) + offsets[None]).reshape(-1, RANK)
        coords = coords[(coords < np.array(self.shape)).all(1)]
        return np.ravel_multi_index(tuple(np.moveaxis(coords, 1, 0)), self.shape).astype(np.int64)


def _refused(reason: str) -> GluonRanges:
    empty = np.zeros((0, RANK), np.int32)
    return GluonRanges(None, reason, data={"lo": empty, "hi": empty})


def gluon_ranges(terms, shape, q_tile, kv_tile, head_dim: int | None = None, dtype=None, *,
                 modes: Sequence[str] = MODES, tile_major: bool = True, as_given: bool = False) -> GluonRanges:
    """The Gluon forward's schedule of the mask whose product terms are `terms` (each a sequence of
    per-dimension `analysis.Rel1D`-like bounds: .dilation, .lo, .hi per coordinate) on grid `shape`,
    for a config with tiles `q_tile` x `kv_tile` (module docstring): the first of `modes` that
    takes it, else every mode's reason. `as_given`: run these tiles, not `kernel_tiles`' (tests)."""
    shape, terms = tuple(int(n) for n in shape), [tuple(t) for t in terms]
    # of the predicated modes only one fits a grid's rank; asked for that one only, say so first
    other = "boxes" if one_d(shape) else "runs"
    if all(m == other for m in modes):
        return _refused("a 1-D token order: its predicate is the runs mode's" if other == "boxes"
                        else f"grid {shape}: the predicated kernel takes 1-D token orders")
    if len(shape) > RANK:
        return _refused(f"grid {shape}: the kernel takes at most {RANK} dimensions")
    if head_dim is not None and head_dim not in GLUON_HEAD_DIMS:
        return _refused(f"head_dim {head_dim}; the kernel takes {GLUON_HEAD_DIMS}")
    if dtype is not None and dtype_name(dtype) not in GLUON_DTYPES:
        return _refused(f"dtype {dtype}; the kernel takes {' and '.join(GLUON_DTYPES)}")
    tiles = (tuple(q_tile), tuple(kv_tile)) if as_given else kernel_tiles(shape, q_tile, kv_tile)
    if isinstance(tiles, str):
        return _refused(tiles)
    if not tile_major and not one_d(shape):
        return _refused("row-major tiles (--no-permute) are not boxes of the grid")
    if any(_layout_dilation(terms, d) != 1 for d in range(len(shape))):
        return _refused("dilated layout: a tile is not a box of memory")
    why = []
    for mode in (m for m in modes if m != other):
        if mode == "whole":
            r = _whole(terms, shape, *tiles)
        elif mode == "runs":
            r = _runs(terms, shape)
        elif mode == "boxes":
            r = _boxes(terms, shape, *tiles, head_dim)
        else:
            raise ValueError(f"mode {mode!r}; the modes are {MODES}")
        if r.ok:
            return r
        why.append(r.reason)
    return _refused("; predicated: ".join(why))


def _layout_dilation(terms, d: int) -> int:
    """The dilation tile-major kernels lay dimension d out by: every term's, else 1
    (`analysis.layout_dilation`, on bare bounds)."""
    dil = {t[d].dilation for t in terms}
    return dil.pop() if len(dil) == 1 else 1


def _undilated(rel) -> bool:
    return rel is None or rel.dilation == 1


def _padded(term) -> tuple:
    return (None,) * (RANK - len(term)) + tuple(term)


def _whole(terms, shape, q_tile, kv_tile) -> GluonRanges:
    for n, qt, kt in zip(shape, q_tile, kv_tile):
        if n % qt or n % kt:
            return _refused(f"grid {shape} is not a multiple of the tiles {tuple(q_tile)} x {tuple(kv_tile)}")
    shape, q_tile, kv_tile = pad_rank(shape), pad_rank(q_tile), pad_rank(kv_tile)
    factors = []
    for term in terms:
        f = _term_factors(term, q_tile, kv_tile)
        if isinstance(f, str):
            return _refused(f)
        factors.append(f)
    head = ("whole", None, shape, q_tile, kv_tile)
    if len(factors) == 1:  # one product term: its box per query tile is the product of its dimensions'
        return GluonRanges(*head, build=lambda: _boxes_of(factors[0]))
    boxes = [(b["lo"], b["hi"]) for b in map(_boxes_of, factors)]
    lo, hi = _merge(boxes, prod(n // t for n, t in zip(shape, q_tile)))
    if isinstance(lo, str):
        return _refused(lo)
    return GluonRanges(*head, data={"lo": lo.astype(np.int32), "hi": hi.astype(np.int32)})


def _term_factors(term, q_tile, kv_tile):
    """Per dimension (first visited key tile, last + 1; 0, 0 where none) over that dimension's query
    tiles, for one product term; or why one of its visited tiles is partial (the first such query
    tile named: a tile pair of a product is visited, or full, exactly when it is in every dimension)."""
    factors, seen, bad = [], [], []
    for rel, qt, kt in zip(_padded(term), q_tile, kv_tile):
        if rel is None:  # a padding dimension: one tile, seen entirely
            factors.append((np.zeros(1, np.int64), np.ones(1, np.int64)))
            seen.append(np.ones(1, bool)), bad.append(np.zeros(1, bool))
            continue
        if rel.dilation != 1:
            return "a dilated (strided) term: none of its tiles is full"
        tab = query_tile_ranges(rel.lo, rel.hi, 1, qt, kt)  # inclusive [a, b] visited, [fa, fb] full
        s = tab[:, 0] <= tab[:, 1]
        factors.append((np.where(s, tab[:, 0], 0), np.where(s, tab[:, 1] + 1, 0)))
        seen.append(s), bad.append(s & ((tab[:, 0] != tab[:, 2]) | (tab[:, 1] != tab[:, 3])))
    if all(x.any() for x in seen):
        # the first busy tile with a partial dimension: per dimension d, d's first partial tile with
        # every other dimension's first seen one; the row-major least of those is the least of all
        firsts = [int(np.argmax(x)) for x in seen]
        cands = [tuple(firsts[:d]) + (int(np.argmax(bad[d])),) + tuple(firsts[d + 1:])
                 for d in range(RANK) if bad[d].any()]
        if cands:
            t = int(np.ravel_multi_index(min(cands), tuple(len(x) for x in seen)))
            return f"query tile {t} visits partially seen key tiles (the whole-tile mode has no predicate)"
    return factors


def _outer(per_dim: list[np.ndarray]) -> np.ndarray:
    """[prod(len), RANK]: each dimension's per-tile values over the row-major query-tile grid."""
    grid = np.meshgrid(*[np.arange(len(x)) for x in per_dim], indexing="ij")
    return np.stack([per_dim[d][grid[d]].reshape(-1) for d in range(len(per_dim))], axis=1)


def _boxes_of(factors) -> dict:
    """lo, hi [q tiles, RANK] of a product term from its per-dimension factors (0, 0 where idle)."""
    lo, hi = _outer([f[0] for f in factors]), _outer([f[1] for f in factors])
    busy = (hi > lo).all(1)
    return {"lo": np.where(busy[:, None], lo, 0).astype(np.int32), "hi": np.where(busy[:, None], hi, 0).astype(np.int32)}


def _merge(boxes: list, q_tiles: int):
    """One box per query tile from every term's boxes, or (why not, None) where their union is not one
    box: the boxes a tile's terms visit must agree before the last dimension and their runs there
    must touch or overlap. The first query tile that fails is named."""
    if not boxes:
        zero = np.zeros((q_tiles, RANK), np.int64)
        return zero, zero.copy()
    lo, hi = np.stack([b[0] for b in boxes]), np.stack([b[1] for b in boxes])  # [terms, q tiles, RANK]
    used = (hi > lo).all(2)
    big = np.int64(1) << 40
    agree = np.ones(q_tiles, bool)
    for x in (lo[..., :-1], hi[..., :-1]):
        agree &= (np.where(used[..., None], x, big).min(0) == np.where(used[..., None], x, -big).max(0)).all(1)
    agree |= used.sum(0) < 2
    a, b = np.where(used, lo[..., -1], big), np.where(used, hi[..., -1], -big)
    order = np.argsort(a, axis=0, kind="stable")
    a, b = np.take_along_axis(a, order, 0), np.take_along_axis(b, order, 0)
    reach = np.maximum.accumulate(b, axis=0)
    gap = (a[1:] > reach[:-1]) & (a[1:] < big)  # [terms - 1, q tiles]
    bad = ~agree | gap.any(0)
    if bad.any():
        t = int(np.nonzero(bad)[0][0])
        if not agree[t]:
            return f"query tile {t}: the terms' key-tile boxes differ before the last dimension (not one box)", None
        k = int(np.nonzero(gap[:, t])[0][0])
        return f"query tile {t} visits key tiles in more than one run (gap at tile {int(reach[k, t])})", None
    first = np.argmax(used, axis=0)  # a term the tile visits (any: they agree before the last dimension)
    tiles = np.arange(q_tiles)
    out_lo, out_hi = lo[first, tiles].copy(), hi[first, tiles].copy()
    busy = used.any(0)
    out_lo[:, -1] = np.where(busy, a[0], 0)
    out_hi[:, -1] = np.where(busy, reach[-1], 0)
    return out_lo, out_hi


def row_key_intervals(terms, n: int) -> np.ndarray | str:
    """A 1-D order's rows' key intervals (`row_runs.row_intervals`) from the terms, or why not."""
    los, his = [], []
    for term in terms:
        if not all(_undilated(rel) for rel in term):
            return "a dilated term: its keys are not an interval per row"
        # a leading dimension has extent 1: the term holds there iff it pairs coordinate 0 with 0
        if any(not (rel.lo[0] <= 0 <= rel.hi[0]) for rel in term[:-1]):
            continue
        los.append(term[-1].lo), his.append(term[-1].hi)
    return row_intervals(los, his, n)


def _runs(terms, shape) -> GluonRanges:
    iv = row_key_intervals(terms, shape[-1])
    return _refused(iv) if isinstance(iv, str) else runs_of_intervals(iv, shape[-1])


def runs_of_intervals(iv: np.ndarray, keys: int) -> GluonRanges:
    """The "runs" schedule of rows with these key intervals ([rows, SLOTS, 2]) over `keys` keys: a
    grid's, or a context-parallel segment's rows over its buffer (maskdsl.analysis.row_runs)."""
    runs = tile_runs(iv, keys)
    if isinstance(runs, str):
        return _refused(runs)
    run_lo, run_hi, flag = runs
    tiles = len(run_lo)
    busy = run_hi[:, 0] > run_lo[:, 0]  # runs fill in order: a tile with a second run has a first
    lo, hi = np.zeros((tiles, RANK), np.int32), np.zeros((tiles, RANK), np.int32)
    hi[busy, :-1] = 1
    lo[:, -1], hi[:, -1] = np.where(busy, run_lo[:, 0], 0), np.where(busy, run_hi[:, 0], 0)
    run2 = np.stack([run_lo[:, 1], run_hi[:, 1]], axis=1).astype(np.int32)
    bounds = np.ascontiguousarray(np.moveaxis(iv, 0, 2)).astype(np.int32)  # [SLOTS, 2, rows]
    data = {"lo": lo, "hi": hi, "run2": run2, "flag": flag, "bounds": bounds}
    r = GluonRanges("runs", None, (1, 1, len(iv)), (1, 1, TILE), (1, 1, TILE), keys, data=data)
    order, long = dispatch_order(r.work(r.busy))
    return GluonRanges(**{**r.__dict__, "data": {**data, "order": r.busy[order]}, "long": long})


def _boxes(terms, shape, q_tile, kv_tile, head_dim) -> GluonRanges:
    if head_dim is not None and head_dim not in BOX_HEAD_DIMS:
        return _refused(f"the per-dimension predicate runs head_dim {' or '.join(map(str, BOX_HEAD_DIMS))} only "
                        f"(at head_dim {head_dim} its masked tiles cost more than the template's)")
    if len(terms) != 1:
        return _refused(f"a union of {len(terms)} product terms: a row's keys are not one box")
    if not all(_undilated(rel) for rel in terms[0]):
        return _refused("a dilated (strided) term: a row's keys are not an interval")
    shape, q_tile, kv_tile = pad_rank(shape), pad_rank(q_tile), pad_rank(kv_tile)
    return GluonRanges("boxes", None, shape, q_tile, kv_tile, build=lambda: _box_data(terms[0], q_tile, kv_tile))


def _box_data(term, q_tile, kv_tile) -> dict:
    """The "boxes" mode's arrays of one product term (GluonRanges)."""
    cols, bounds = [[], [], [], []], []
    for rel, qt, kt in zip(_padded(term), q_tile, kv_tile):
        lo, hi = (np.zeros(1, np.int64),) * 2 if rel is None else (rel.lo, rel.hi)  # padding: one key, seen
        empty = lo > hi
        bounds += [np.where(empty, 1, lo), np.where(empty, 0, hi)]
        tab = query_tile_ranges(lo, hi, 1, qt, kt)  # inclusive [a, b] visited, [fa, fb] full
        seen, full = tab[:, 0] <= tab[:, 1], tab[:, 2] <= tab[:, 3]
        for k, (x, on, plus) in enumerate(((tab[:, 0], seen, 0), (tab[:, 1], seen, 1), (tab[:, 2], full, 0),
                                           (tab[:, 3], full, 1))):
            cols[k].append(np.where(on, x + plus, 0))
    data = _boxes_of([(cols[0][d], cols[1][d]) for d in range(RANK)])
    data["full_lo"], data["full_hi"] = _outer(cols[2]).astype(np.int32), _outer(cols[3]).astype(np.int32)
    data["bounds"] = np.concatenate(bounds).astype(np.int32)
    return data


@dataclass(frozen=True, eq=False)
class KeyTileVisits:
    """The transposed schedule of a whole-tile table: per key tile (flat, row-major over the key-tile
    grid `k_tiles`), the query tiles whose box visits it, ascending: `q[offsets[k]:offsets[k + 1]]`.
    What a backward walking key tiles reads in place of the forward's per-query-tile boxes."""

    k_tiles: tuple[int, ...]
    offsets: np.ndarray
    q: np.ndarray

    def of(self, key_tile: int) -> np.ndarray:
        return self.q[self.offsets[key_tile]:self.offsets[key_tile + 1]]


def key_tile_visits(ranges: GluonRanges) -> KeyTileVisits:
    """The transposed schedule of a "whole" schedule: every (query tile, key tile) pair of its boxes,
    grouped by key tile. Exact: in the whole-tile mode a query tile visits exactly its box."""
    if ranges.mode != "whole":
        raise ValueError(f"the transposed schedule is the whole-tile mode's; this one is {ranges.mode!r}")
    k_tiles = tuple(-(-n // t) for n, t in zip(ranges.shape, ranges.kv_tile))
    busy = ranges.busy
    ext = (ranges.hi[busy] - ranges.lo[busy]).astype(np.int64)  # [busy, RANK]
    count = ext.prod(1)
    q = np.repeat(busy, count)
    local = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)  # index inside the box
    k_coord = np.empty((len(local), RANK), np.int64)
    rest = local
    for d in range(RANK - 1, -1, -1):
        e = np.repeat(ext[:, d], count)
        k_coord[:, d] = np.repeat(ranges.lo[busy, d], count) + rest % e
        rest = rest // e
    key = np.ravel_multi_index(tuple(k_coord.T), k_tiles) if len(local) else np.zeros(0, np.int64)
    order = np.lexsort((q, key))
    offsets = np.zeros(prod(k_tiles) + 1, np.int64)
    np.cumsum(np.bincount(key, minlength=prod(k_tiles)), out=offsets[1:])
    return KeyTileVisits(k_tiles, offsets, q[order])


def segment_ranges(whole: GluonRanges, q_rows: tuple[int, int], k_rows: tuple[int, int]) -> GluonRanges:
    """The schedule of rows [qa, qb) over a buffer holding keys [ka, kb) of the grid (context
    parallelism's segments): the whole grid's row intervals cut to the buffer, in its coordinates."""
    (qa, qb), (ka, kb) = q_rows, k_rows
    lo = whole.bounds[:, 0, qa:qb].T.astype(np.int64) - ka  # [rows, SLOTS]
    hi = whole.bounds[:, 1, qa:qb].T.astype(np.int64) - ka
    lo, hi = np.maximum(lo, 0), np.minimum(hi, kb - ka - 1)
    empty = lo > hi
    iv = np.stack([np.where(empty, EMPTY[0], lo), np.where(empty, EMPTY[1], hi)], axis=2)
    return runs_of_intervals(iv, kb - ka)
