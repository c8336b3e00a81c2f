"""Which 1-D masks the Gluon forward runs with a predicate, and the tables it reads for them
(the rule itself: maskdsl.row_runs).

`codegen.gluon_plan` admits masks whose visited tiles are all full: no causal mask, no sliding
window whose edges cut a tile, no sink. Those are the masks LLM users run most, so the kernel also
has a predicated mode for 1-D token orders. Each row's attended keys are stored exactly as at most
`SLOTS` disjoint intervals (the union of the mask's product terms, merged per row: a causal window
plus sinks is two), each query tile of 128 rows walks at most `RUNS` runs of 128-key tiles, and
the kernel masks S on the first and last tile of each run. Every other tile of a run must be full
(every row sees every key of it); where one is not (the few query tiles where a window meets a
sink, or the sink's own rows that see everything), the table row's flag makes the kernel mask
every tile of that query tile: slower there, exact everywhere.

Masks with more intervals per row or more runs per query tile (dilated or strided-by-group terms,
unions of far-apart windows) are refused and run on the Triton template; so are grids of more than
one non-unit dimension (their tiles are boxes: `gluon_plan`). Nothing here imports Gluon.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from maskdsl.codegen.plan import KernelPlan
from maskdsl.intervals import SymRel, evaluate
from maskdsl.row_runs import BLOCK, EMPTY, SLOTS, longest_first, row_intervals, tile_runs

ROW = 12  # table columns: c0..c2, [lo, hi) x 3 dimensions, the second run's [lo, hi), the flag


@dataclass(frozen=True)
class RunRanges:
    """The predicated schedule of a 1-D mask, or why there is none.

    `table`: int32 [busy query tiles, ROW] in tile order; `idle`: query tiles that visit nothing;
    `bounds`: int32 [SLOTS, 2, tokens], each row's key intervals [lo, hi] (inclusive; EMPTY when unused).
    `shape`, `q_tile`, `kv_tile` are padded to the kernel's 3 dimensions, as `gluon_plan.TileRanges`'.
    """

    table: np.ndarray
    idle: np.ndarray
    bounds: np.ndarray
    reason: str | None = None
    shape: tuple[int, ...] = ()
    long: int = 0  # the table's first rows, far longer than the rest: dispatched first on every head
    keys: int = 0  # the key extent (a segment's buffer; the grid's otherwise)
    mode = "runs"  # as gluon_plan.TileRanges.mode
    q_tile: tuple[int, ...] = (1, 1, BLOCK)
    kv_tile: tuple[int, ...] = (1, 1, BLOCK)

    @property
    def ok(self) -> bool:
        return self.reason is None

    def rows(self, tiles: np.ndarray) -> np.ndarray:
        """Token indices of the rows of these query tiles (those inside the grid)."""
        rows = (np.asarray(tiles, np.int64)[:, None] * BLOCK + np.arange(BLOCK)).reshape(-1)
        return rows[rows < self.shape[-1]]


def _refused(reason: str) -> RunRanges:
    return RunRanges(np.zeros((0, ROW), np.int32), np.zeros(0, np.int32), np.zeros((SLOTS, 2, 0), np.int32), reason)


def plan_intervals(plan: KernelPlan) -> np.ndarray | str:
    """The plan's rows' key intervals (`row_runs.row_intervals`) from its product terms, or why not."""
    n = plan.shape[-1]
    los, his = [], []
    for term in plan.terms:
        *lead, last = term
        if any(td.dilation != 1 for td in term):
            return "a dilated term: its keys are not an interval per row"
        # a leading dimension has extent 1: the term holds there iff it pairs coordinate 0 with 0
        if any(not (lo[0] <= 0 <= hi[0]) for lo, hi in (evaluate(SymRel(1, td.lo, td.hi, td.qa, td.qb), 1)
                                                      for td in lead)):
            continue
        lo, hi = evaluate(SymRel(1, last.lo, last.hi, last.qa, last.qb), n)
        los.append(lo), his.append(hi)
    return row_intervals(los, his, n)


def run_ranges(plan: KernelPlan) -> RunRanges:
    """The predicated schedule of the plan's mask (maskdsl.row_runs)."""
    if plan.rank > 3 or any(e != 1 for e in plan.shape[:-1]):
        return _refused(f"grid {plan.shape}: the predicated kernel takes 1-D token orders")
    if any(d.dilation != 1 for d in plan.dims):
        return _refused("dilated layout: a tile is not a run of memory")
    iv = plan_intervals(plan)
    if isinstance(iv, str):
        return _refused(iv)
    return schedule(iv, plan.shape[-1])


def segment_ranges(whole: RunRanges, q_rows: tuple[int, int], k_rows: tuple[int, int]) -> RunRanges:
    """The schedule of rows [qa, qb) over a buffer holding keys [ka, kb) of the grid (context
    parallelism's segments): the whole grid's row intervals cut to the buffer, in its coordinates."""
    (qa, qb), (ka, kb) = q_rows, k_rows
    lo = whole.bounds[:, 0, qa:qb].T.astype(np.int64) - ka  # [rows, SLOTS]
    hi = whole.bounds[:, 1, qa:qb].T.astype(np.int64) - ka
    lo, hi = np.maximum(lo, 0), np.minimum(hi, kb - ka - 1)
    empty = lo > hi
    iv = np.stack([np.where(empty, EMPTY[0], lo), np.where(empty, EMPTY[1], hi)], axis=2)
    return schedule(iv, kb - ka)


def schedule(iv: np.ndarray, keys: int) -> RunRanges:
    """The kernel's table for rows with these key intervals over `keys` keys (maskdsl.row_runs)."""
    runs = tile_runs(iv, keys)
    if isinstance(runs, str):
        return _refused(runs)
    run_lo, run_hi, flag = runs
    nruns = (run_hi > run_lo).sum(1)
    busy = np.nonzero(nruns > 0)[0]
    table = np.zeros((len(busy), ROW), np.int64)
    table[:, 2] = busy
    table[:, 4] = table[:, 6] = 1  # the leading dimensions' one tile
    table[:, 7], table[:, 8] = run_lo[busy, 0], run_hi[busy, 0]
    table[:, 9], table[:, 10] = run_lo[busy, 1], run_hi[busy, 1]
    table[:, 11] = flag[busy]
    table, long = longest_first(table)
    bounds = np.ascontiguousarray(np.moveaxis(iv, 0, 2)).astype(np.int32)  # [SLOTS, 2, tokens]
    return RunRanges(table.astype(np.int32), np.nonzero(nruns == 0)[0].astype(np.int32), bounds, None,
                     (1, 1, len(iv)), long, keys=keys)
