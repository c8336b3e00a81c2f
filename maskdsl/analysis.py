"""Exact, analytical counting of attended pairs: the mask as a union of per-dimension products.

Every static primitive is a union of *products*: sets of (query, key) pairs that factor over
the grid's dimensions, each factor a 1-D relation "query coordinate i sees the keys j with
j = i (mod d) and lo[i] <= j // d <= hi[i]" (an arithmetic interval, `Rel1D`):

* a neighborhood is one product (its per-dimension intervals come from maskdsl.intervals);
* flat causal (j <= i in row-major order) is the disjoint union over k of
  "equal in dims < k, j_k < i_k (<= in the last dim), anything after";
* sink(n): "query among the first n tokens" or "key among the first n tokens"; a row-major
  prefix of n tokens is a disjoint union of at most rank boxes (the mixed-radix digits of n);
* an intersection of products is a product (intersect per dimension), so `&` distributes over
  the union, and a union of products is counted exactly by inclusion-exclusion.

Counting a product over a box of queries and a box of keys is a product of per-dimension
counts, each a difference of prefix sums of closed-form per-query counts. Nothing is ever
materialized at [L, L]: cost is O(n_d x edges) per dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from maskdsl import ir
from maskdsl.intervals import group_bounds


class NotAnalyzable(ValueError):
    """The mask has a part the closed-form analysis does not cover (said with the reason)."""


@dataclass(frozen=True, eq=False)
class Rel1D:
    """Query i sees keys j with j % dilation == i % dilation and lo[i] <= j // dilation <= hi[i]."""

    n: int
    dilation: int
    lo: np.ndarray
    hi: np.ndarray

    @property
    def empty(self) -> bool:
        return bool(np.all(self.lo > self.hi))

    def counts_below(self, edges: np.ndarray) -> np.ndarray:
        """[n, E]: how many keys j < edges[e] query i sees."""
        i = np.arange(self.n, dtype=np.int64)[:, None]
        d = self.dilation
        g = i % d
        t_end = (edges[None, :] - g + d - 1) // d  # group coordinates below the edge
        return np.clip(np.minimum(self.hi[:, None] + 1, t_end) - self.lo[:, None], 0, None)


def _rel(n, lo, hi, dilation=1) -> Rel1D:
    i = np.zeros(n, dtype=np.int64)
    return Rel1D(n, dilation, np.broadcast_to(np.asarray(lo, np.int64), i.shape).copy(),
                 np.broadcast_to(np.asarray(hi, np.int64), i.shape).copy())


def rel_all(n):
    return _rel(n, 0, n - 1)


def rel_before(n, inclusive):
    i = np.arange(n)
    return _rel(n, 0, i if inclusive else i - 1)


def rel_equal(n):
    i = np.arange(n)
    return _rel(n, i, i)


def rel_keys_in(n, start, stop):
    return _rel(n, start, stop - 1)


def rel_queries_in(n, start, stop):
    i = np.arange(n)
    inside = (i >= start) & (i < stop)
    return _rel(n, 0, np.where(inside, n - 1, -1))


def rel_neighborhood(n, window, dilation, stride, causal) -> Rel1D:
    lo, hi = group_bounds(n, window, dilation, stride, causal)
    return Rel1D(n, dilation, lo, hi)


def intersect_rel(a: Rel1D, b: Rel1D) -> Rel1D:
    if a.dilation == b.dilation:
        return Rel1D(a.n, a.dilation, np.maximum(a.lo, b.lo), np.minimum(a.hi, b.hi))
    if a.dilation != 1 and b.dilation != 1:
        raise NotAnalyzable(f"intersecting dilations {a.dilation} and {b.dilation} in one dimension is not supported")
    if b.dilation == 1:
        a, b = b, a
    # a is contiguous in plain coordinates: restate its bounds in b's dilation-group coordinates.
    d = b.dilation
    g = np.arange(a.n) % d
    t_lo = -((g - a.lo) // d)  # ceil((lo - g) / d)
    t_hi = (a.hi - g) // d
    return Rel1D(a.n, d, np.maximum(t_lo, b.lo), np.minimum(t_hi, b.hi))


Product = tuple[Rel1D, ...]


def _rel_within(a: Rel1D, b: Rel1D) -> bool:
    """Every key of `a` is a key of `b`, for every query (a sufficient, cheap test)."""
    rows = a.lo <= a.hi
    if a.dilation == b.dilation:
        return bool(np.all(~rows | ((a.lo >= b.lo) & (a.hi <= b.hi))))
    if b.dilation == 1:
        g = np.arange(a.n) % a.dilation
        first, last = g + a.dilation * a.lo, g + a.dilation * a.hi
        return bool(np.all(~rows | ((first >= b.lo) & (last <= b.hi))))
    return False


def simplify(prods: list[Product]) -> list[Product]:
    """Drop products contained in another (duplicates too): unions of sinks and causal pieces repeat a lot."""
    kept: list[Product] = []
    for idx, p in enumerate(prods):
        later = prods[idx + 1:]
        if any(all(_rel_within(x, y) for x, y in zip(p, q)) for q in kept + later):
            continue
        kept.append(p)
    return kept


def intersect_products(a: Product, b: Product) -> Product | None:
    out = tuple(intersect_rel(x, y) for x, y in zip(a, b))
    return None if any(r.empty for r in out) else out


def _prefix_boxes(shape, n_tokens):
    """The first n_tokens of a row-major grid as disjoint boxes [(start, stop) per dimension]."""
    digits, rem = [], n_tokens
    for k in range(len(shape)):
        block = int(np.prod(shape[k + 1:], dtype=np.int64))
        digits.append(rem // block)
        rem %= block
    if n_tokens >= int(np.prod(shape)):
        return [tuple((0, n) for n in shape)]
    boxes = []
    for k, c in enumerate(digits):
        if c:
            boxes.append(tuple((digits[m], digits[m] + 1) for m in range(k)) + ((0, c),)
                         + tuple((0, n) for n in shape[k + 1:]))
    return boxes


def products(expr: ir.MaskExpr, shape: tuple[int, ...]) -> list[Product]:
    """The static mask as a list of products whose union it is (empty products dropped)."""
    rank = len(shape)
    if isinstance(expr, ir.Neighborhood):
        return [tuple(rel_neighborhood(n, expr.window[d], expr.dilation[d], expr.stride[d], expr.causal[d])
                      for d, n in enumerate(shape))]
    if isinstance(expr, ir.Full):
        return [tuple(rel_all(n) for n in shape)]
    if isinstance(expr, ir.Causal):
        out = []
        for k in range(rank):
            out.append(tuple(rel_equal(n) if d < k else rel_before(n, inclusive=(k == rank - 1)) if d == k
                             else rel_all(n) for d, n in enumerate(shape)))
        return [p for p in out if not any(r.empty for r in p)]
    if isinstance(expr, ir.Sink):
        boxes = _prefix_boxes(shape, expr.n)
        rows = [tuple(rel_queries_in(n, *box[d]) for d, n in enumerate(shape)) for box in boxes]
        cols = [tuple(rel_keys_in(n, *box[d]) for d, n in enumerate(shape)) for box in boxes]
        return rows + cols
    if isinstance(expr, ir.Union_):
        return simplify([p for t in expr.terms for p in products(t, shape)])
    if isinstance(expr, ir.Intersection):
        acc = products(expr.terms[0], shape)
        for t in expr.terms[1:]:
            nxt = products(t, shape)
            acc = simplify([q for a in acc for b in nxt if (q := intersect_products(a, b)) is not None])
        return acc
    if isinstance(expr, ir.TopK):
        raise NotAnalyzable(f"{expr.fmt()} depends on the data; only its static part can be counted exactly")
    raise TypeError(f"not a mask expression: {expr!r}")


MAX_TERMS = 4096


def inclusion_exclusion(prods: list[Product]) -> list[tuple[int, Product]]:
    """(sign, product) pairs whose signed counts sum to the count of the union.

    Empty intersections prune every superset, so disjoint pieces (causal's, a sink's boxes)
    cost nothing; the cap only bites on unions of many overlapping terms.
    """
    out: list[tuple[int, Product]] = []

    def rec(start, current, size):
        for idx in range(start, len(prods)):
            nxt = prods[idx] if current is None else intersect_products(current, prods[idx])
            if nxt is None:
                continue
            out.append((1 if size % 2 == 0 else -1, nxt))
            if len(out) > MAX_TERMS:
                raise NotAnalyzable(f"the mask expands to more than {MAX_TERMS} overlapping terms; "
                                    "it cannot be counted exactly in closed form")
            rec(idx + 1, nxt, size + 1)

    rec(0, None, 0)
    return out


def box_pair_counts(prod: Product, qboxes: np.ndarray, kboxes: np.ndarray) -> np.ndarray:
    """[NQ, NK] attended pairs of `prod` between query boxes and key boxes ([N, rank, 2] start/stop)."""
    result = np.ones((len(qboxes), len(kboxes)), dtype=np.int64)
    for d, rel in enumerate(prod):
        edges = np.unique(kboxes[:, d, :])
        cum = rel.counts_below(edges)
        table = np.zeros((rel.n + 1, len(edges)), dtype=np.int64)
        np.cumsum(cum, axis=0, out=table[1:])
        e0 = np.searchsorted(edges, kboxes[:, d, 0])
        e1 = np.searchsorted(edges, kboxes[:, d, 1])
        i0, i1 = qboxes[:, d, 0], qboxes[:, d, 1]
        t0, t1 = table[i0], table[i1]
        result *= (t1[:, e1] - t1[:, e0]) - (t0[:, e1] - t0[:, e0])
    return result


def mask_box_counts(expr: ir.MaskExpr, shape, qboxes: np.ndarray, kboxes: np.ndarray) -> np.ndarray:
    """[NQ, NK] attended pairs of the whole static mask between boxes, exactly."""
    total = np.zeros((len(qboxes), len(kboxes)), dtype=np.int64)
    for sign, prod in inclusion_exclusion(products(expr, shape)):
        total += sign * box_pair_counts(prod, qboxes, kboxes)
    return total


def whole_grid(shape) -> np.ndarray:
    return np.array([[(0, n) for n in shape]], dtype=np.int64)


def attended_pairs(expr: ir.MaskExpr, shape) -> int:
    """How many (query, key) pairs the static mask attends, exactly, without materializing it."""
    box = whole_grid(shape)
    return int(mask_box_counts(expr, shape, box, box)[0, 0])


def static_part(expr: ir.MaskExpr) -> ir.MaskExpr | None:
    """The mask with its data-dependent (top-k) terms dropped from unions; None if nothing static is left.

    Under an intersection a top-k term only removes keys, so the static terms bound it from above.
    """
    if isinstance(expr, ir.TopK):
        return None
    if isinstance(expr, ir.Union_):
        kept = [p for t in expr.terms if (p := static_part(t)) is not None]
        return ir.union(*kept) if kept else None
    if isinstance(expr, ir.Intersection):
        kept = [p for t in expr.terms if (p := static_part(t)) is not None]
        return ir.intersection(*kept) if kept else ir.Full()
    return expr
