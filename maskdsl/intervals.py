"""Closed-form per-dimension key intervals, as sympy expressions: the one source of truth.

The simulator evaluates these (numpy, through `lambdify`) and codegen prints them into the
Triton kernel, so the tile schedule predicted and the one executed cannot drift apart.

A `SymRel` is one dimension of one product term of a mask. It runs on *dilation-group
coordinates*: a query at original coordinate c = G + d*I (G = c mod d, I = c // d) in a group
of length N sees the keys G + d*J for lo <= J <= hi, provided qa <= c < qb (else none).
lo and hi are expressions of I, G, N and are non-decreasing in I, which makes tile bounds
closed-form: a query tile [i0, i1] sees keys inside [lo(i0), hi(i1)], and every key in
[lo(i1), hi(i0)] is seen by all of its queries (the tile's "full" key range).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import sympy as sp

I, G, N = sp.symbols("i g n", integer=True, nonnegative=True)


def key_interval(window: int, stride: int, causal: bool) -> tuple[sp.Expr, sp.Expr]:
    """(lo, hi) of a neighborhood dimension in group coordinates (maskdsl.semantics states the rule)."""
    w, s = sp.Integer(window), sp.Integer(stride)
    group_start = sp.floor(I / s) * s
    if causal:
        leader = sp.Min(group_start + s - 1, N - 1)  # the stride group's last query
        return sp.Max(leader - w + 1, 0), I
    leader = sp.Min(group_start + stride // 2, N - 1)  # the centre (right-hand one for even s)
    lo = sp.Min(sp.Max(leader - window // 2, 0), N - w)
    return lo, lo + w - 1


@dataclass(frozen=True)
class SymRel:
    """One dimension of a product term (see the module docstring)."""

    dilation: int
    lo: sp.Expr
    hi: sp.Expr
    qa: int = 0  # queries with original coordinate in [qa, qb) take part
    qb: int | None = None  # None: to the end of the dimension

    def query_stop(self, n: int) -> int:
        return n if self.qb is None else min(self.qb, n)


def rel_neighborhood(window, dilation, stride, causal) -> SymRel:
    lo, hi = key_interval(window, stride, causal)
    return SymRel(dilation, lo, hi)


def rel_all() -> SymRel:
    return SymRel(1, sp.Integer(0), N - 1)


def rel_before(inclusive: bool) -> SymRel:
    return SymRel(1, sp.Integer(0), I if inclusive else I - 1)


def rel_equal() -> SymRel:
    return SymRel(1, I, I)


def rel_keys_in(start: int, stop: int) -> SymRel:
    return SymRel(1, sp.Integer(start), sp.Integer(stop - 1))


def rel_queries_in(start: int, stop: int) -> SymRel:
    return SymRel(1, sp.Integer(0), N - 1, start, stop)


# Stands for "the end of the dimension" once a contiguous relation moves to group coordinates;
# every consumer clamps hi to the group's last coordinate, so any bound past the end is exact.
BEYOND = 2**30


def _to_groups(rel: SymRel, d: int) -> SymRel:
    """Restate a contiguous (d = 1) relation in the coordinates of dilation-d groups."""
    subs = {I: G + d * I, N: BEYOND}
    lo, hi = rel.lo.subs(subs, simultaneous=True), rel.hi.subs(subs, simultaneous=True)
    return SymRel(d, sp.ceiling((lo - G) / d), sp.floor((hi - G) / d), rel.qa, rel.qb)


def intersect(a: SymRel, b: SymRel) -> SymRel:
    """Per-dimension intersection; None-free. Raises ValueError for two different dilations."""
    if a.dilation != b.dilation:
        if a.dilation != 1 and b.dilation != 1:
            raise ValueError(f"intersecting dilations {a.dilation} and {b.dilation} in one dimension is not supported")
        if a.dilation == 1:
            a = _to_groups(a, b.dilation)
        else:
            b = _to_groups(b, a.dilation)
    qb = a.qb if b.qb is None else b.qb if a.qb is None else min(a.qb, b.qb)
    return SymRel(a.dilation, sp.Max(a.lo, b.lo), sp.Min(a.hi, b.hi), max(a.qa, b.qa), qb)


@lru_cache(maxsize=4096)
def _lambdified(expr: sp.Expr):
    return sp.lambdify((I, G, N), expr, "numpy")


def evaluate(rel: SymRel, n: int) -> tuple[np.ndarray, np.ndarray]:
    """lo, hi (group coordinates) for every query coordinate 0..n-1; empty rows get lo > hi."""
    c = np.arange(n, dtype=np.int64)
    d = rel.dilation
    g, i = c % d, c // d
    glen = (n - g + d - 1) // d
    lo = np.broadcast_to(np.asarray(_lambdified(rel.lo)(i, g, glen)), (n,)).astype(np.int64)
    hi = np.broadcast_to(np.asarray(_lambdified(rel.hi)(i, g, glen)), (n,)).astype(np.int64)
    hi = np.minimum(hi, glen - 1)
    inside = (c >= rel.qa) & (c < rel.query_stop(n))
    return np.where(inside, np.maximum(lo, 0), 0), np.where(inside, hi, -1)

