"""A 1-D mask as runs of key tiles per query tile, with each row's keys as a few intervals.

The Gluon forward's "runs" mode (maskdsl.analysis.gluon_rule, whose schedule codegen.gluon_plan writes as
tables and the simulator costs): the per-row key bounds of the mask's product terms go in. A row's attended keys are
the union of its terms' intervals; merged, they are at most SLOTS disjoint intervals for the masks
the kernel takes (a causal window plus sinks is two). A query tile of BLOCK rows walks the key
tiles its rows' intervals touch, at most RUNS runs of them; the kernel masks the first and last
tile of each run and takes the others whole, unless some row does not see all of a run's inner
tiles: then its flag makes the kernel mask every tile of that query tile.
"""

from __future__ import annotations

import numpy as np

from maskdsl.analysis.tile_table import RANK, RUN2, box_hi, box_lo

BLOCK = 128  # rows of a query tile and keys of a key tile
SLOTS = 2  # key intervals per row the predicate holds
RUNS = 2  # runs of key tiles per query tile the loader walks
EMPTY = (1, 0)  # an empty interval (lo > hi)
_BIG = np.int64(1) << 40


def row_intervals(los: list[np.ndarray], his: list[np.ndarray], n: int) -> np.ndarray | str:
    """[n, SLOTS, 2] each row's keys as disjoint, sorted, non-adjacent intervals [lo, hi] (EMPTY fills
    unused slots), from the terms' per-row bounds (lo > hi: the term holds no key of that row); or
    why a row needs more than SLOTS."""
    if not los:
        return np.tile(np.array(EMPTY, np.int64), (n, SLOTS, 1))
    big = _BIG
    lo, hi = np.stack(los, 1).astype(np.int64), np.stack(his, 1).astype(np.int64)  # [n, terms]
    empty = lo > hi
    lo, hi = np.where(empty, big, lo), np.where(empty, -big, hi)
    order = np.argsort(lo, axis=1, kind="stable")
    lo, hi = np.take_along_axis(lo, order, 1), np.take_along_axis(hi, order, 1)
    out = np.tile(np.array(EMPTY, np.int64), (n, SLOTS, 1))
    count = np.zeros(n, np.int64)  # intervals emitted so far
    cur_lo, cur_hi = lo[:, 0].copy(), hi[:, 0].copy()
    rows = np.arange(n)
    for t in range(1, lo.shape[1] + 1):
        last = t == lo.shape[1]
        nxt_lo = np.full(n, big) if last else lo[:, t]
        nxt_hi = np.full(n, -big) if last else hi[:, t]
        joins = (nxt_lo <= cur_hi + 1) & (nxt_lo < big)  # overlapping or adjacent: one interval
        cur_hi = np.where(joins, np.maximum(cur_hi, nxt_hi), cur_hi)
        emit = ~joins & (cur_lo < big)
        if (emit & (count >= SLOTS)).any():
            row = int(np.nonzero(emit & (count >= SLOTS))[0][0])
            return f"row {row} attends more than {SLOTS} separate key intervals"
        idx = rows[emit]
        out[idx, count[emit], 0], out[idx, count[emit], 1] = cur_lo[emit], cur_hi[emit]
        count += emit
        cur_lo = np.where(joins, cur_lo, nxt_lo)
        cur_hi = np.where(joins, cur_hi, nxt_hi)
    return out


def tile_runs(iv: np.ndarray, keys: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | str:
    """(run_lo, run_hi [query tiles, RUNS], flag [query tiles]) from `row_intervals`: each query tile's
    runs of key tiles [lo, hi) (empty: 0, 0) and whether the kernel must mask all of them; or why a
    query tile has more than RUNS runs. `keys`: the key extent (default the rows': a whole grid; a
    segment's buffer can differ)."""
    n = len(iv)
    keys = n if keys is None else keys
    tiles = -(-n // BLOCK)
    pad = tiles * BLOCK - n
    padded = np.concatenate([iv, np.tile(np.array(EMPTY, np.int64), (pad, SLOTS, 1))]) if pad else iv
    lo, hi = padded[..., 0].reshape(tiles, BLOCK * SLOTS), padded[..., 1].reshape(tiles, BLOCK * SLOTS)
    used = lo <= hi
    big = _BIG
    a = np.where(used, lo // BLOCK, big)  # the rows' intervals in key tiles, sorted and merged
    b = np.where(used, hi // BLOCK, -1)
    order = np.argsort(a, axis=1, kind="stable")
    a, b = np.take_along_axis(a, order, 1), np.take_along_axis(b, order, 1)
    reach = np.maximum.accumulate(b, axis=1)
    starts = np.ones_like(used)
    starts[:, 1:] = a[:, 1:] > reach[:, :-1] + 1
    starts &= a < big
    nruns = starts.sum(1)
    if (nruns > RUNS).any():
        t = int(np.nonzero(nruns > RUNS)[0][0])
        return f"query tile {t} visits key tiles in more than {RUNS} runs"
    run_lo = np.zeros((tiles, RUNS), np.int64)
    run_hi = np.zeros((tiles, RUNS), np.int64)  # exclusive
    k = np.cumsum(starts, axis=1) - 1  # run index of each interval
    for r in range(RUNS):
        mine = (k == r) & (a < big)
        run_lo[:, r] = np.where(nruns > r, np.where(mine, a, big).min(1), 0)
        run_hi[:, r] = np.where(nruns > r, np.where(mine, reach, -1).max(1) + 1, 0)
    # the flag: some row does not see a run's inner tiles [lo + 1, hi - 2] within one of its intervals
    last_tile = (keys - 1) // BLOCK
    cov_lo = -(-padded[..., 0] // BLOCK)  # [rows, SLOTS]: tiles every key of which the interval holds
    cov_hi = (padded[..., 1] + 1) // BLOCK - 1
    cov_hi = np.where(padded[..., 1] >= keys - 1, last_tile, cov_hi)  # the ragged last tile ends at keys - 1
    cov_ok = padded[..., 0] <= padded[..., 1]
    valid = (np.arange(tiles * BLOCK) < n).reshape(tiles, BLOCK)
    flag = np.zeros(tiles, bool)
    for r in range(RUNS):
        x = np.repeat(run_lo[:, r] + 1, BLOCK)[:, None]
        y = np.repeat(run_hi[:, r] - 2, BLOCK)[:, None]
        covered = (cov_ok & (cov_lo <= x) & (cov_hi >= y)).any(1) | (x[:, 0] > y[:, 0])
        flag |= (~covered.reshape(tiles, BLOCK) & valid).any(1)
    return run_lo, run_hi, flag


LONG = 4  # a query tile with this many times the median tile's work is a long pole


def dispatch_order(work: np.ndarray) -> tuple[np.ndarray, int]:
    """Query tiles (by their work: key tiles walked) in the predicated kernel's dispatch order, descending
    work (stable: equal tiles keep their order, so neighbouring programs still share keys), and how many
    lead the rest by LONG times the median.

    Why: the hardware dispatches programs in grid order. A causal mask's last tiles are its longest:
    run last, they leave a tail of one tile's loop. A sink's own rows walk every key: dispatched in tile
    order per head, the last head's starts near the end of the kernel and runs alone, leaving a tail as
    long as the whole row. The kernel dispatches the long rows of every
    head first (codegen.gluon_fwd's LONG), then each head's rest in this order. The simulator schedules
    the same order (simulator.gluon)."""
    work = np.asarray(work)
    order = np.argsort(-work, kind="stable")
    long = int((work[order] > LONG * np.median(work)).sum()) if len(work) else 0
    return order, long


def longest_first(table: np.ndarray) -> tuple[np.ndarray, int]:
    """A "runs" row table's rows in dispatch order (`dispatch_order` of each row's work: its two runs'
    key tiles, read by maskdsl.analysis.tile_table's names), and the long rows' count."""
    last = RANK - 1  # the first run's dimension
    work = (table[:, box_hi(last)] - table[:, box_lo(last)]) + (table[:, RUN2 + 1] - table[:, RUN2])
    order, long = dispatch_order(work)
    return table[order], long
