"""Closed-form key intervals of one neighborhood dimension, as sympy expressions.

These expressions are the single source of truth shared by the simulator (evaluated with
numpy through `lambdify`) and the kernels (printed into Triton source by codegen). They run
on *dilation-group coordinates*: a query at group coordinate `i` in a group of length `n`
sees group coordinates lo(i) <= j <= hi(i) (inclusive). See maskdsl.semantics for the rule.

Both bounds are non-decreasing in i, which is what makes tile bounds closed-form: a query tile
[i0, i1] sees keys inside [lo(i0), hi(i1)], and every key in [lo(i1), hi(i0)] is seen by all of
its queries (the tile's "full" key range, empty when lo(i1) > hi(i0)).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import sympy as sp

I, N = sp.symbols("i n", integer=True, nonnegative=True)


@lru_cache(maxsize=None)
def key_interval(window: int, stride: int, causal: bool) -> tuple[sp.Expr, sp.Expr]:
    """(lo, hi) in group coordinates as sympy expressions of the query coordinate I and group length N."""
    w, s = sp.Integer(window), sp.Integer(stride)
    group_start = sp.floor(I / s) * s
    if causal:
        leader = sp.Min(group_start + s - 1, N - 1)  # the stride group's last query
        return sp.Max(leader - w + 1, 0), I
    leader = sp.Min(group_start + stride // 2, N - 1)  # the centre (right-hand one for even s)
    lo = sp.Min(sp.Max(leader - window // 2, 0), N - w)
    return lo, lo + w - 1


@lru_cache(maxsize=None)
def _numeric(window: int, stride: int, causal: bool):
    lo, hi = key_interval(window, stride, causal)
    return sp.lambdify((I, N), lo, "numpy"), sp.lambdify((I, N), hi, "numpy")


def group_bounds(n: int, window: int, dilation: int, stride: int, causal: bool):
    """Per query coordinate (0..n-1, original coordinates): the dilation group size, and lo/hi in group coordinates."""
    i = np.arange(n, dtype=np.int64)
    g = i % dilation
    gi = i // dilation
    glen = (n - g + dilation - 1) // dilation
    lo_f, hi_f = _numeric(window, stride, causal)
    lo = np.broadcast_to(np.asarray(lo_f(gi, glen), dtype=np.int64), (n,)).copy()
    hi = np.broadcast_to(np.asarray(hi_f(gi, glen), dtype=np.int64), (n,)).copy()
    return lo, hi
