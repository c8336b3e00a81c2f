"""Exact, analytical counting of attended pairs: the mask as a union of per-dimension products.

Every static primitive is a union of *products*: sets of (query, key) pairs that factor over
the grid's dimensions, each factor a 1-D relation "query coordinate i sees the keys j with
j = i (mod d) and lo[i] <= j // d <= hi[i]" (an arithmetic interval, `Rel1D`):

* a neighborhood is one product (its per-dimension intervals come from maskdsl.analysis.intervals);
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

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from maskdsl.spec import ir
from maskdsl.analysis.boxes import flat_range_boxes
from maskdsl.spec.limits import MAX_PRODUCTS, work_problem
from maskdsl.analysis.intervals import (SymRel, evaluate, intersect, rel_all, rel_before, rel_equal, rel_keys_in,
                               rel_neighborhood, rel_queries_in)


class NotAnalyzable(ValueError):
    """The mask has a part the closed-form analysis does not cover (said with the reason)."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


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

    def key_span(self) -> tuple[np.ndarray, np.ndarray]:
        """First and last key of every query in original coordinates (first > last for empty rows)."""
        g = np.arange(self.n, dtype=np.int64) % self.dilation
        rows = self.lo <= self.hi
        first = np.where(rows, g + self.dilation * self.lo, self.n)
        last = np.where(rows, g + self.dilation * self.hi, -1)
        return first, last

    def pairs(self) -> int:
        """Attended (query, key) pairs of this dimension over its whole extent."""
        return int(np.clip(self.hi - self.lo + 1, 0, None).sum())

    def counts_below(self, edges: np.ndarray) -> np.ndarray:
        """[n, E]: how many keys j < edges[e] query i sees."""
        i = np.arange(self.n, dtype=np.int64)[:, None]
        d = self.dilation
        g = i % d
        t_end = (edges[None, :] - g + d - 1) // d  # group coordinates below the edge
        return np.clip(np.minimum(self.hi[:, None] + 1, t_end) - self.lo[:, None], 0, None)

    def prefix_counts(self, bounds: np.ndarray, edges: np.ndarray) -> np.ndarray:
        """[X, E]: attended pairs with query i < bounds[x] and key j < edges[e].

        `bounds` is sorted, unique, starts at 0 and ends at n. Same numbers as summing
        `counts_below` over query prefixes, without its [n, E] table: rows are sorted by
        (query segment, dilation group, lo) and by (segment, group, hi), so each segment's sum
        at each edge is a difference of prefix sums found by binary search. That is
        O(n log n + X * d * E log n), which keeps a 32k-token dimension with 256 tiles in ms.
        For a non-empty row, |[lo, hi] ∩ [0, e)| = sum_{lo<e}(hi+1-lo) - sum_{hi+1>e}(hi+1-e)
        + sum_{lo>=e}(hi+1-e); each of the three is such a prefix sum.
        """
        n, d = self.n, self.dilation
        i = np.arange(n, dtype=np.int64)
        nseg = len(bounds) - 1
        big, key_lo, cum_w, cum_h, key_hi, cum_h2 = self.sorted_sums((np.searchsorted(bounds, i, side="right") - 1) * d
                                                                     + i % d)
        g = np.arange(d, dtype=np.int64)
        t_end = np.clip((edges[None, :] - g[:, None] + d - 1) // d, 0, None)  # [d, E] edge in group coordinates
        base = (np.arange(nseg * d, dtype=np.int64) * big).reshape(nseg, d, 1)
        query = base + t_end[None]
        start, stop = np.searchsorted(key_lo, base), np.searchsorted(key_lo, base + big)
        p = np.searchsorted(key_lo, query)  # rows with lo < e before p
        below = cum_w[p] - cum_w[start]
        past_lo = (cum_h[stop] - cum_h[p]) - t_end * (stop - p)
        stop_h = np.searchsorted(key_hi, base + big)
        ph = np.searchsorted(key_hi, query, side="right")  # rows with hi + 1 > e from ph on
        past_hi = (cum_h2[stop_h] - cum_h2[ph]) - t_end * (stop_h - ph)
        seg = (below - past_hi + past_lo).sum(axis=1)
        out = np.zeros((nseg + 1, len(edges)), dtype=np.int64)
        np.cumsum(seg, axis=0, out=out[1:])
        return out

    def sorted_sums(self, bucket: np.ndarray):
        """(big, key_lo, cum_w, cum_h, key_hi, cum_h2): the non-empty rows keyed by (bucket, lo) and by
        (bucket, hi + 1) (key = bucket * big + value, big above every value), with prefix sums of
        hi + 1 - lo and of hi + 1 in the first order and of hi + 1 in the second: what every prefix
        count of the relation reads (`prefix_counts`, simulator.band). `bucket` is per row."""
        rows = self.lo <= self.hi
        bucket = bucket[rows]
        lo = np.maximum(self.lo[rows], 0)
        hi1 = self.hi[rows] + 1
        big = self.n + 2  # above every lo, hi + 1 and group-coordinate edge
        key_lo = bucket * big + lo
        order = np.argsort(key_lo, kind="stable")
        key_lo = key_lo[order]
        cum_w = np.concatenate([[0], np.cumsum((hi1 - lo)[order])])
        cum_h = np.concatenate([[0], np.cumsum(hi1[order])])
        key_hi = bucket * big + hi1
        order = np.argsort(key_hi, kind="stable")
        return big, key_lo, cum_w, cum_h, key_hi[order], np.concatenate([[0], np.cumsum(hi1[order])])

    def permuted(self) -> "Rel1D":
        """The same relation over dilation-group-major positions (GNA's dilation permutation).

        Group g occupies positions [off_g, off_g + len_g); there a dilated relation is contiguous.
        """
        d, n = self.dilation, self.n
        if d == 1:
            return self
        c = np.arange(n)
        g = c % d
        offsets = np.concatenate([[0], np.cumsum([(n - k + d - 1) // d for k in range(d)])])
        pos = offsets[g] + c // d
        lo, hi = np.empty(n, np.int64), np.empty(n, np.int64)
        lo[pos], hi[pos] = offsets[g] + self.lo, offsets[g] + self.hi
        empty = self.lo > self.hi
        lo[pos[empty]], hi[pos[empty]] = 0, -1
        return Rel1D(n, 1, lo, hi)


Product = tuple[SymRel, ...]


@dataclass(frozen=True, eq=False)
class Term:
    """A product term: symbolic (for codegen) and evaluated (for counting) side by side."""

    sym: Product
    num: tuple[Rel1D, ...]

    @classmethod
    def build(cls, sym: Product, shape) -> "Term | None":
        num = []
        for rel, n in zip(sym, shape):
            lo, hi = evaluate(rel, n)
            r = Rel1D(n, rel.dilation, lo, hi)
            if r.empty:
                return None
            num.append(r)
        return cls(tuple(sym), tuple(num))


def intersect_terms(a: Term, b: Term, shape) -> Term | None:
    try:
        sym = tuple(intersect(x, y, n) for x, y, n in zip(a.sym, b.sym, shape))
    except ValueError as exc:
        raise NotAnalyzable(str(exc)) from None
    return Term.build(sym, shape)


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


def simplify(terms: list[Term]) -> list[Term]:
    """Drop terms contained in another (duplicates too): unions of sinks and causal pieces repeat a lot."""
    kept: list[Term] = []
    for idx, t in enumerate(terms):
        if any(all(_rel_within(x, y) for x, y in zip(t.num, u.num)) for u in kept + terms[idx + 1:]):
            continue
        kept.append(t)
    return kept


def _symbolic(expr: ir.MaskExpr, shape) -> list[Product]:
    rank = len(shape)
    if isinstance(expr, ir.Neighborhood):
        return [tuple(rel_neighborhood(expr.window[d], expr.dilation[d], expr.stride[d], expr.causal[d])
                      for d in range(rank))]
    if isinstance(expr, ir.Full):
        return [tuple(rel_all() for _ in shape)]
    if isinstance(expr, ir.Causal):
        return [tuple(rel_equal() if d < k else rel_before(inclusive=(k == rank - 1)) if d == k else rel_all()
                      for d in range(rank)) for k in range(rank)]
    if isinstance(expr, ir.Sink):
        boxes = flat_range_boxes(shape, 0, min(expr.n, math.prod(shape)))
        rows = [tuple(rel_queries_in(*box[d]) for d in range(rank)) for box in boxes]
        cols = [tuple(rel_keys_in(*box[d]) for d in range(rank)) for box in boxes]
        return rows + cols
    if isinstance(expr, ir.TopK):
        raise NotAnalyzable(f"{expr.fmt()} depends on the data; only its static part can be counted exactly")
    if isinstance(expr, (ir.Document, ir.Prefix)):  # maskdsl.spec.documents is these masks' analysis
        raise NotAnalyzable(f"`{expr.fmt()}` depends on the offsets passed with each call; maskdsl.compile, "
                            "`maskdsl simulate --lengths` and `maskdsl bench --documents` take document masks")
    raise TypeError(f"not a mask expression: {expr!r}")


def products(expr: ir.MaskExpr, shape: tuple[int, ...]) -> list[Term]:
    """The static mask as a list of product terms whose union it is (empty ones dropped).

    Cached on (expression, shape): building the sympy expressions costs ~10 ms per call, far
    more than counting, and the simulator and codegen ask for the same mask again and again.
    The list is fresh per call; the Terms in it are shared and must be treated as read-only.
    """
    return list(_products(expr, tuple(int(n) for n in shape)))


def num_products(expr: ir.MaskExpr, shape: tuple[int, ...]) -> list[Term]:
    """`products` with numbers only (each Term's `sym` is None): what counting and the simulator need.

    Same terms, same order: leaves are evaluated from their sympy intervals (cached per leaf), but
    intersections are taken numerically (`intersect_rels`), which stays cheap however long an
    intersection chain is; chained sympy Min/Max grow and slow down with every step.
    """
    return list(_num_products(expr, tuple(int(n) for n in shape)))


def _expand(expr: ir.MaskExpr, shape: tuple[int, ...], recurse, meet, leaf) -> tuple[Term, ...]:
    """Unions and intersections of product terms, bounded as they grow (the one rule for both the
    numeric and the symbolic term lists): a 12-term list is the most a mask may have, so a union of
    more than a few times that, or an intersection of more than its square of pairs, is refused
    before it is built. `recurse` expands a sub-expression, `meet` intersects two terms (None if
    empty), `leaf` builds a primitive's terms."""
    if isinstance(expr, ir.Union_):
        raw = [t for term in expr.terms for t in recurse(term, shape)]
        if len(raw) > 4 * MAX_PRODUCTS:
            raise NotAnalyzable(_too_many(f"more than {4 * MAX_PRODUCTS}"))
        return tuple(simplify(raw))
    if isinstance(expr, ir.Intersection):
        acc = list(recurse(expr.terms[0], shape))
        for term in expr.terms[1:]:
            nxt = recurse(term, shape)
            if len(acc) * len(nxt) > MAX_PRODUCTS**2:
                raise NotAnalyzable(_too_many(f"up to {len(acc) * len(nxt)}"))
            acc = simplify([q for x in acc for y in nxt if (q := meet(x, y)) is not None])
        return tuple(acc)
    return leaf()


@lru_cache(maxsize=512)
def _num_products(expr: ir.MaskExpr, shape: tuple[int, ...]) -> tuple[Term, ...]:
    return _expand(expr, shape, _num_products, intersect_num,
                   lambda: tuple(Term(None, t.num) for t in _products(expr, shape)))


def check_analyzable(expr: ir.MaskExpr, shape) -> None:
    """Raise NotAnalyzable (with the reason) unless the static part of `expr` can be counted exactly.

    The parser calls this for every mask, so that whatever parses can be checked, simulated and
    counted; it is the expansion `products` does anyway (cached), plus the size bound.
    """
    if sum(isinstance(node, ir.TopK) for node in ir.walk(expr)) > 1:
        raise NotAnalyzable("a mask may hold one top-k term; combine several selections into one topk(...)")
    if ir.is_dynamic(expr):
        from maskdsl.spec.topk_form import normal_form

        try:
            form = normal_form(expr)
        except ValueError as exc:
            raise NotAnalyzable(str(exc)) from None
        parts = [e for e in (form.static, form.restrict) if e is not None]
        # S and R are each counted, simulated and compiled on their own, and the envelope S | R bounds
        # what selection can reach: each is held to the bound (S | full is one term whatever S is).
        checked = parts + ([ir.union(*parts)] if len(parts) > 1 else [])
    else:
        checked = [expr]
    shape = tuple(int(n) for n in shape)
    work_hint = "use fewer terms or a shorter grid; docs/LIMITS.md gives the bound on the analysis's work"
    primitives = sum(not isinstance(node, (ir.Union_, ir.Intersection)) for node in ir.walk(expr))
    if (problem := work_problem(primitives, None, shape)) is not None:  # before expanding: that is the work
        raise NotAnalyzable(problem, work_hint)
    for part in checked:
        terms = num_products(part, shape)
        if len(terms) > MAX_PRODUCTS:
            raise NotAnalyzable(_too_many(len(terms)))
        if (problem := work_problem(0, len(terms), shape)) is not None:
            raise NotAnalyzable(problem, work_hint)
        if ir.is_dynamic(expr) and any(rel.dilation != 1 for t in terms for rel in t.num):
            raise NotAnalyzable(
                "top-k cannot be combined with a dilated neighborhood: top-k picks key blocks of the grid in "
                "row-major order, while a dilated mask is run (and simulated) on the grid regrouped by dilation",
                "use the top-k mask without the dilated part, or the dilated neighborhood without topk(...)")


def _too_many(count) -> str:
    return (f"the mask expands to {count} product terms, more than the {MAX_PRODUCTS} its exact analysis accepts "
            "(a union is counted over the overlapping subsets of its terms); causal is one term per dimension, "
            "sink up to two, and & multiplies the terms of its operands")


@lru_cache(maxsize=512)
def _products(expr: ir.MaskExpr, shape: tuple[int, ...]) -> tuple[Term, ...]:
    return _expand(expr, shape, _products, lambda x, y: intersect_terms(x, y, shape),
                   lambda: tuple(t for sym in _symbolic(expr, shape) if (t := Term.build(sym, shape)) is not None))


def layout_dilation(terms: list[Term], rank: int) -> tuple[int, ...]:
    """The dilation of each dimension's group permutation: the one every term has there, else 1.

    Tile-major kernels lay dilation groups out contiguously, which only helps when every term keeps
    to its group. Where terms differ (`sliding_window(3) | dilated(3, 4)`, or a dilated window with
    a sink) the dimension keeps its own order: a dilated term's keys are then a strided set inside a
    key range, which kernels bound by that range and the predicate makes exact. The simulator and
    codegen both lay tiles out by this one answer, so what is predicted is what runs.
    """
    out = []
    for d in range(rank):
        dil = {t.num[d].dilation for t in terms}
        out.append(dil.pop() if len(dil) == 1 else 1)
    return tuple(out)


def _permuted(rel: Rel1D, dilation: int) -> Rel1D:
    # a relation whose dilation the layout does not permute by stays in the dimension's own order
    return rel.permuted() if rel.dilation == dilation else rel


def permuted_rels(term: Term, dilation: tuple[int, ...]) -> tuple[Rel1D, ...]:
    """The term's relations over dilation-group-major positions (`dilation` from `layout_dilation`).

    The coordinates tile-major kernels (and the simulator) cut tiles in: there every relation is
    contiguous, so a tile's keys are an interval per dimension.
    """
    return tuple(_permuted(r, d) for r, d in zip(term.num, dilation))


def intersect_rels(a: Rel1D, b: Rel1D) -> Rel1D | None:
    """The keys both relations give each query, numerically (None when no query keeps any).

    Counting needs only the numbers, and sympy intersections cost milliseconds each, which made
    inclusion-exclusion over a union of a dozen terms take minutes. Two dilations meet on their
    least common multiple (j = i mod d1 and mod d2); past the extent that is j = i, so it is capped at n.
    """
    n = a.n
    if a.dilation == b.dilation:
        d, lo, hi = a.dilation, np.maximum(a.lo, b.lo), np.minimum(a.hi, b.hi)
    else:
        d = min(math.lcm(a.dilation, b.dilation), n)
        (fa, la), (fb, lb) = a.key_span(), b.key_span()
        g = np.arange(n, dtype=np.int64) % d
        first, last = np.maximum(fa, fb), np.minimum(la, lb)
        lo, hi = -((g - first) // d), (last - g) // d
    rows = lo <= hi
    if not rows.any():
        return None
    return Rel1D(n, d, np.where(rows, lo, 0), np.where(rows, hi, -1))


def intersect_num(a: Term, b: Term) -> Term | None:
    rels = []
    for x, y in zip(a.num, b.num):
        r = intersect_rels(x, y)
        if r is None:
            return None
        rels.append(r)
    return Term(None, tuple(rels))


def inclusion_exclusion(terms: list[Term], shape) -> list[tuple[int, Term]]:
    """(sign, term) pairs whose signed counts sum to the count of the union.

    Empty intersections prune every superset, so disjoint pieces (causal's, a sink's boxes)
    cost nothing. The language bounds a mask to `limits.MAX_PRODUCTS` terms, so at most
    2**MAX_PRODUCTS - 1 intersections, each numeric and O(extent) per dimension. The terms
    returned carry numbers only (`sym` is None): they are for counting, not for codegen.
    """
    if len(terms) > MAX_PRODUCTS:
        raise NotAnalyzable(f"the mask expands to {len(terms)} product terms, more than {MAX_PRODUCTS}")
    out: list[tuple[int, Term]] = []

    def rec(start, current, size):
        for idx in range(start, len(terms)):
            nxt = terms[idx] if current is None else intersect_num(current, terms[idx])
            if nxt is None:
                continue
            out.append((1 if size % 2 == 0 else -1, nxt))
            rec(idx + 1, nxt, size + 1)

    rec(0, None, 0)
    return out


def signed_terms(expr: ir.MaskExpr, shape) -> list[tuple[int, Term]]:
    """`inclusion_exclusion(num_products(expr, shape), shape)`, cached on (expression, shape).

    Counting many tile configurations of one mask must not expand the union each time.
    """
    return list(_signed_terms(expr, tuple(int(n) for n in shape)))


@lru_cache(maxsize=256)
def _signed_terms(expr: ir.MaskExpr, shape: tuple[int, ...]) -> tuple[tuple[int, Term], ...]:
    return tuple(inclusion_exclusion(num_products(expr, shape), shape))


def box_pair_counts(rels: tuple[Rel1D, ...], qboxes: np.ndarray, kboxes: np.ndarray) -> np.ndarray:
    """[NQ, NK] attended pairs of a product between query boxes and key boxes ([N, rank, 2] start/stop)."""
    result = np.ones((len(qboxes), len(kboxes)), dtype=np.int64)
    for d, rel in enumerate(rels):
        edges = np.unique(kboxes[:, d, :])
        bounds = np.unique(np.concatenate([[0, rel.n], qboxes[:, d, :].reshape(-1)]))
        table = rel.prefix_counts(bounds, edges)
        e0 = np.searchsorted(edges, kboxes[:, d, 0])
        e1 = np.searchsorted(edges, kboxes[:, d, 1])
        t0 = table[np.searchsorted(bounds, qboxes[:, d, 0])]
        t1 = table[np.searchsorted(bounds, qboxes[:, d, 1])]
        result *= (t1[:, e1] - t1[:, e0]) - (t0[:, e1] - t0[:, e0])
    return result


def mask_box_counts(expr: ir.MaskExpr, shape, qboxes: np.ndarray, kboxes: np.ndarray,
                    permuted: bool = False) -> np.ndarray:
    """[NQ, NK] attended pairs of the whole static mask between boxes, exactly.

    With `permuted`, box coordinates are positions in the dilation-group-major order of
    `layout_dilation` (each dimension's groups laid out one after another).
    """
    dilation = layout_dilation(num_products(expr, shape), len(shape)) if permuted else None
    total = np.zeros((len(qboxes), len(kboxes)), dtype=np.int64)
    for sign, term in signed_terms(expr, shape):
        rels = term.num if dilation is None else permuted_rels(term, dilation)
        total += sign * box_pair_counts(rels, qboxes, kboxes)
    return total


def attended_pairs(expr: ir.MaskExpr, shape) -> int:
    """How many (query, key) pairs the static mask attends, exactly, without materializing it.

    Per-dimension counts are int64 (at most extent**2); their products and the signed sum are Python
    integers, so a 65536 x 65536 grid of `full` gives 2**64, not an int64 wrap-around.
    """
    total = 0
    for sign, term in signed_terms(expr, shape):
        count = 1
        for rel in term.num:
            count *= rel.pairs()
        total += sign * count
    return total

