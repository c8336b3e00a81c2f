"""Which keys a decode step can reach: per query position, its keys as at most two flat intervals.

On the analysis floor because codegen's decode kernel reads the table (codegen.decode) and the
simulator costs the bytes it reaches (simulator.decode): one rule for both.

Decode runs the new tokens of a sequence against its cache, so the kernel needs, on the device and
without knowing the lengths in advance, the keys a block of consecutive query positions can see. The
table holds it for every position of the grid once: each product term of the mask
(maskdsl.analysis.counts) gives a query a box of keys, whose first and last keys in row-major order
bound an interval; a row's intervals are merged (maskdsl.analysis.row_runs) into at most SLOTS disjoint
ones, or into one covering interval where they would need more. The intervals may hold keys the
mask does not attend (a box's row-major span, a dilation group's gaps): the kernel's predicate
decides pair by pair, the table only bounds what is read.

The last key of each row is exact (a product of per-dimension key sets has its row-major last key at
the corner of the per-dimension maxima), which is what decides whether a decode step has every key
its new tokens see already in the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from maskdsl.analysis.counts import num_products
from maskdsl.analysis.row_runs import SLOTS, row_intervals
from maskdsl.spec import ir

MAX_Q_LEN = 16
"""Most new tokens per sequence one decode call takes (the kernel packs a GQA group's rows into one tile)."""


@dataclass(frozen=True, eq=False)
class ReachTable:
    """`intervals` [L, 2 * SLOTS] int32: per query position, (lo, hi) inclusive key intervals, sorted and
    disjoint (an empty slot is lo > hi); `last` [L] int32: the last key each position sees (-1: none);
    `widest`: most keys one position's intervals span (what one decode row can reach at most); `exact`:
    whether the intervals hold exactly the keys each position sees (a 1-D grid, no dilation, at most SLOTS
    intervals per row), not a superset."""

    intervals: np.ndarray
    last: np.ndarray
    widest: int
    exact: bool = False

    @property
    def lookahead(self) -> tuple[int, int]:
        """(position, how many tokens past itself it sees) of the position that sees furthest ahead."""
        ahead = np.where(self.last >= 0, self.last - np.arange(len(self.last)), 0)
        p = int(np.argmax(ahead))
        return p, int(ahead[p])


def reach_table(mask: ir.MaskDef) -> ReachTable:
    """The table of a static `mask` (a top-k selection is not known before the data: `reach_table_of`
    its normal form's parts)."""
    return reach_table_of(mask.expr, tuple(mask.layout.shape))


def reach_table_of(expr: ir.MaskExpr | None, shape: tuple[int, ...]) -> ReachTable:
    """The table of a static expression on a grid (None: no key for any position)."""
    tokens = math.prod(shape)
    if expr is None:
        empty = np.tile(np.array([1, 0], np.int32), (tokens, SLOTS))
        return ReachTable(empty, np.full(tokens, -1, np.int32), 0, True)
    coords = np.indices(shape).reshape(len(shape), tokens)  # row-major: position p has coords[:, p]
    los, his = [], []
    terms = num_products(expr, shape)
    exact = len(shape) == 1 and all(rel.dilation == 1 for term in terms for rel in term.num)
    for term in terms:
        first = np.zeros(tokens, np.int64)
        last = np.zeros(tokens, np.int64)
        seen = np.ones(tokens, bool)
        for d, rel in enumerate(term.num):
            f, l = rel.key_span()
            f, l = f[coords[d]], l[coords[d]]
            seen &= f <= l
            first = first * shape[d] + f
            last = last * shape[d] + l
        los.append(np.where(seen, first, 1))
        his.append(np.where(seen, last, 0))
    iv = row_intervals(los, his, tokens)
    if isinstance(iv, str):  # more than SLOTS separate intervals in some row: one covering interval per row
        exact = False
        lo = np.min([np.where(a <= b, a, tokens) for a, b in zip(los, his)], axis=0)
        hi = np.max([np.where(a <= b, b, -1) for a, b in zip(los, his)], axis=0)
        iv = np.tile(np.array([1, 0], np.int64), (tokens, SLOTS, 1))
        iv[:, 0, 0], iv[:, 0, 1] = np.where(lo <= hi, lo, 1), np.where(lo <= hi, hi, 0)
    used = iv[..., 0] <= iv[..., 1]
    last = np.where(used, iv[..., 1], -1).max(axis=1)
    widest = int(np.where(used, iv[..., 1] - iv[..., 0] + 1, 0).sum(axis=1).max(initial=0))
    return ReachTable(np.ascontiguousarray(iv.reshape(tokens, 2 * SLOTS), np.int32), last.astype(np.int32), widest,
                      exact)


def decode_problem(mask: ir.MaskDef, table: ReachTable) -> str | None:
    """Why no decode step can run this mask exactly, else None: a mask whose query sees MAX_Q_LEN or more
    tokens past itself needs keys no cache holds when its tokens arrive at most MAX_Q_LEN at a time.
    `table` is the mask's (a top-k mask's envelope S | R: every key a selection can reach)."""
    p, ahead = table.lookahead
    if ahead < MAX_Q_LEN:
        return None
    return (f"mask {mask.name!r} ({mask.expr.fmt()}) lets the query at position {p} see key {p + ahead}, "
            f"{ahead} tokens later; a decode step appends at most {MAX_Q_LEN} tokens, so that key is never in "
            "the cache when the query runs")


def step_ranges(table: ReachTable, lengths, q_len: int, capacity: int | None = None) -> np.ndarray:
    """[B, SLOTS, 2] the key ranges [lo, hi] (inclusive; lo > hi: empty) a decode step reads per sequence:
    per slot the lowest first and highest last key of the new rows at positions lengths[b] - q_len ..
    lengths[b] - 1, cut to the keys that exist, each slot starting past the ones before it. The kernel
    computes the same on the device (codegen.decode.kernel `_slot`); here for the simulator and tests."""
    lengths = np.asarray(lengths, np.int64)
    tokens = len(table.last)
    exist = np.minimum(lengths, tokens if capacity is None else min(capacity, tokens))
    pos = lengths[:, None] - q_len + np.arange(q_len)[None, :]
    ok = (pos >= 0) & (pos < tokens)
    rows = table.intervals[np.clip(pos, 0, tokens - 1)].astype(np.int64)  # [B, q_len, 2 * SLOTS]
    out = np.zeros((len(lengths), SLOTS, 2), np.int64)
    reach = np.full(len(lengths), -1, np.int64)
    for s in range(SLOTS):
        lo, hi = rows[..., 2 * s], rows[..., 2 * s + 1]
        used = ok & (lo <= hi)
        a = np.where(used, lo, np.iinfo(np.int32).max).min(1)
        b = np.where(used, hi, -1).max(1)
        a, b = np.maximum(a, reach + 1), np.minimum(b, exist - 1)
        out[:, s, 0], out[:, s, 1] = a, b
        reach = np.maximum(reach, b)
    return out


def reached_keys(table: ReachTable, lengths, q_len: int, capacity: int | None = None) -> np.ndarray:
    """[B] keys each sequence's decode step reads (the sum of `step_ranges`' lengths)."""
    r = step_ranges(table, lengths, q_len, capacity)
    return np.clip(r[..., 1] - r[..., 0] + 1, 0, None).sum(1)
