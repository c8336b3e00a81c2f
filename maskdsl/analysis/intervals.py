"""Closed-form per-dimension key intervals, as sympy expressions: the one source of truth.

The simulator evaluates these (exact integer arithmetic, `evaluate`) and codegen prints them into the
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
    """(lo, hi) of a neighborhood dimension in group coordinates (maskdsl.harness.semantics states the rule)."""
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


def _to_groups(rel: SymRel, d: int, n: int) -> SymRel:
    """Restate a contiguous (d = 1) relation on a dimension of extent n in dilation-d group coordinates."""
    subs = {I: G + d * I, N: n}  # the real extent: a lo clamped at the right edge (n - w) stays exact
    lo, hi = rel.lo.subs(subs, simultaneous=True), rel.hi.subs(subs, simultaneous=True)
    return SymRel(d, sp.ceiling((lo - G) / d), sp.floor((hi - G) / d), rel.qa, rel.qb)


def intersect(a: SymRel, b: SymRel, n: int) -> SymRel:
    """Per-dimension intersection on a dimension of extent n. ValueError for two different dilations."""
    if a.dilation != b.dilation:
        if a.dilation != 1 and b.dilation != 1:
            raise ValueError(f"intersecting dilations {a.dilation} and {b.dilation} in one dimension is not supported")
        if a.dilation == 1:
            a = _to_groups(a, b.dilation, n)
        else:
            b = _to_groups(b, a.dilation, n)
    qb = a.qb if b.qb is None else b.qb if a.qb is None else min(a.qb, b.qb)
    return SymRel(a.dilation, sp.Max(a.lo, b.lo), sp.Min(a.hi, b.hi), max(a.qa, b.qa), qb)


def query_domain(dilation: int, n: int) -> dict:
    """Every valid query point (I, G, N) of a dimension of extent n in dilation-d group coordinates.

    The bounds are only ever used there (codegen's tiles clip to it), so two expressions equal on
    it are interchangeable: that is what lets codegen drop a clamp that never binds.
    """
    c = np.arange(n, dtype=np.int64)
    g = c % dilation
    return {I: c // dilation, G: g, N: (n - g + dilation - 1) // dilation}


def values(expr: sp.Expr, env: dict) -> np.ndarray:
    """`expr` at every point of `env` (from `query_domain`), in exact integer arithmetic."""
    return np.broadcast_to(np.asarray(_int_eval(sp.sympify(expr), env), dtype=np.int64), env[I].shape)


def evaluate(rel: SymRel, n: int) -> tuple[np.ndarray, np.ndarray]:
    """lo, hi (group coordinates) for every query coordinate 0..n-1, in integer arithmetic.

    Empty rows get lo > hi. Floor/ceiling of a fraction is an integer floor division of its
    numerator, as codegen's printer does (not `lambdify`, which expands floor((x - g)/3) into
    floor(-g/3 + x/3) in floats: 0 for x = 5, g = 2).
    """
    c = np.arange(n, dtype=np.int64)
    env = query_domain(rel.dilation, n)
    lo = values(rel.lo, env)
    hi = np.minimum(values(rel.hi, env), env[N] - 1)
    inside = (c >= rel.qa) & (c < rel.query_stop(n))
    return np.where(inside, np.maximum(lo, 0), 0), np.where(inside, hi, -1)


def _int_eval(e: sp.Expr, env: dict):
    return _compiled(e)(env)


@lru_cache(maxsize=8192)
def _compiled(e: sp.Expr):
    """A function env -> value for an interval expression (integers, i/g/n, +, *, Min, Max,
    floor, ceiling), exact in integers: each fraction is put over one integer denominator and
    floor-divided (sympy only leaves a bare fraction where it proved the value an integer)."""
    if e.is_Integer:
        value = int(e)
        return lambda env: value
    if e in (I, G, N):
        return lambda env: env[e]
    if isinstance(e, (sp.Min, sp.Max)):
        fn = np.minimum if isinstance(e, sp.Min) else np.maximum
        parts = [_compiled(a) for a in e.args]

        def fold(env):
            out = parts[0](env)
            for p in parts[1:]:
                out = fn(out, p(env))
            return out
        return fold
    if isinstance(e, (sp.floor, sp.ceiling, sp.Add, sp.Mul)):
        inner = e.args[0] if isinstance(e, (sp.floor, sp.ceiling)) else e
        num, den = sp.fraction(sp.together(inner))
        if not (den.is_Integer and den > 0):
            raise ValueError(f"cannot evaluate {e}: the denominator must be a positive integer")
        den = int(den)
        if den != 1:
            top = _compiled(sp.expand(num))
            if isinstance(e, sp.ceiling):
                return lambda env: -((-top(env)) // den)
            return lambda env: top(env) // den
        if isinstance(e, (sp.floor, sp.ceiling)):
            return _compiled(num)
    if isinstance(e, sp.Add):
        parts = [_compiled(a) for a in e.args]

        def add(env):
            out = 0
            for p in parts:
                out = out + p(env)
            return out
        return add
    if isinstance(e, sp.Mul):
        coeff, rest = e.as_coeff_Mul()
        factor = int(coeff)  # an integer: fractions were taken out above
        parts = [_compiled(a) for a in sp.Mul.make_args(rest)]

        def mul(env):
            out = factor
            for p in parts:
                out = out * p(env)
            return out
        return mul
    raise ValueError(f"cannot evaluate {e!r} ({type(e).__name__}) in integer arithmetic")


