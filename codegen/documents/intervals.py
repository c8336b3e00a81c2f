"""The document form's intervals on the device: what each kernel derives from the per-token metadata.

`maskdsl.spec.documents.row_interval` / `column_interval` are the rules in plain integers; these are the
same rules on tensors of rows or keys (`tests/test_documents_kernels.py` holds them to each other). A
term arrives as a constexpr tuple (active, causal, window_causal, window, prefix, sink_keys, sink_queries),
so nothing derived from the offsets is ever a constexpr: new offsets never compile anything.

Every interval lies inside [start, end) of the token's document, and `load_meta` clamps start and end into
[0, L] (start <= end), so whatever offsets a call passes unchecked, no kernel reads or writes out of bounds.
"""

from __future__ import annotations

import triton
import triton.language as tl

TERM_FIELDS = 7
INACTIVE = (0,) * TERM_FIELDS  # the padding term: its intervals are empty


@triton.jit
def load_meta(META, tok, ok, L):
    """(start, end, prefix length) of each token's document, in tokens, clamped so that 0 <= start <= end <= L
    and 0 <= prefix <= end - start. META is int32 [3, L] (codegen.documents.compiled.metadata); start and end
    are whole frames (multiples of INNER, as L is) whatever the offsets."""
    s = tl.load(META + tok, mask=ok, other=0)
    e = tl.load(META + L + tok, mask=ok, other=0)
    p = tl.load(META + 2 * L + tok, mask=ok, other=0)
    s = tl.minimum(tl.maximum(s, 0), L)
    e = tl.minimum(tl.maximum(e, s), L)
    p = tl.minimum(tl.maximum(p, 0), e - s)
    return s, e, p


@triton.jit
def row_interval(i, s, e, p, T: tl.constexpr, INNER: tl.constexpr):
    """Keys [lo, hi) query token i sees under term T, INNER tokens per frame
    (maskdsl.spec.documents.row_interval)."""
    lo = s
    hi = e
    if T[0] == 0:
        hi = lo
    else:
        if T[1] != 0:
            hi = tl.minimum(hi, i + 1)
        if T[2] != 0:
            fi = i // INNER
            lo = tl.maximum(lo, (fi - T[2] + 1) * INNER)
            hi = tl.minimum(hi, (fi + 1) * INNER)
        if T[3] != 0:
            fi = i // INNER
            fs = s // INNER
            n = e // INNER - fs
            w = tl.minimum(n, T[3])
            first = fs + tl.minimum(tl.maximum(fi - fs - w // 2, 0), n - w)
            lo = tl.maximum(lo, first * INNER)
            hi = tl.minimum(hi, (first + w) * INNER)
        if T[4] != 0:
            hi = tl.minimum(hi, s + p)
        if T[5] != 0:
            hi = tl.minimum(hi, s + T[5])
        if T[6] != 0:
            hi = tl.where(i - s < T[6], hi, lo)
    return lo, hi


@triton.jit
def column_interval(j, s, e, p, T: tl.constexpr, INNER: tl.constexpr):
    """Query tokens [lo, hi) that see key token j under term T (maskdsl.spec.documents.column_interval)."""
    lo = s
    hi = e
    if T[0] == 0:
        hi = lo
    else:
        if T[1] != 0:
            lo = tl.maximum(lo, j)
        if T[2] != 0:
            fj = j // INNER
            lo = tl.maximum(lo, fj * INNER)
            hi = tl.minimum(hi, (fj + T[2]) * INNER)
        if T[3] != 0:
            fj = j // INNER
            fs = s // INNER
            fe = e // INNER
            w = tl.minimum(fe - fs, T[3])
            h = w // 2
            lo = tl.maximum(lo, tl.where(fj - w < fs, s, (fj - w + h + 1) * INNER))
            hi = tl.minimum(hi, tl.where(fj >= fe - w, e, (fj + h + 1) * INNER))
        if T[4] != 0:
            hi = tl.where(j - s < p, hi, lo)
        if T[5] != 0:
            hi = tl.where(j - s < T[5], hi, lo)
        if T[6] != 0:
            hi = tl.minimum(hi, s + T[6])
    return lo, hi


@triton.jit
def tile_span(lo, hi, ok, BLOCK: tl.constexpr):
    """Tiles [first, last) of BLOCK tokens that hold a token of any nonempty [lo, hi) among `ok`
    ((2147483647, 0) when none is nonempty, so that `next_tile` never enters it)."""
    some = ok & (lo < hi)
    first = tl.min(tl.where(some, lo, 2147483647), 0)
    first = tl.where(first == 2147483647, first, first // BLOCK)
    last = (tl.max(tl.where(some, hi, 0), 0) + BLOCK - 1) // BLOCK
    return first, last


@triton.jit
def full_span(lo, hi, ok, BLOCK: tl.constexpr):
    """Tiles [first, last) that every [lo, hi) among `ok` holds whole (an empty one among them: none)."""
    top = tl.max(tl.where(ok, lo, 0), 0)
    bottom = tl.min(tl.where(ok, hi, 2147483647), 0)
    return (top + BLOCK - 1) // BLOCK, bottom // BLOCK


@triton.jit
def term_spans(lane, s, e, p, ok, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, T3: tl.constexpr,
               INNER: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """Each of the four terms' intervals for the lanes (query rows with ROWS, else keys: `row_interval` or
    `column_interval`), the tiles of BLOCK tokens each visits [a, b) and those it holds whole [f, g):
    what every walking program derives from the metadata before its loop."""
    if ROWS:
        lo0, hi0 = row_interval(lane, s, e, p, T0, INNER)
        lo1, hi1 = row_interval(lane, s, e, p, T1, INNER)
        lo2, hi2 = row_interval(lane, s, e, p, T2, INNER)
        lo3, hi3 = row_interval(lane, s, e, p, T3, INNER)
    else:
        lo0, hi0 = column_interval(lane, s, e, p, T0, INNER)
        lo1, hi1 = column_interval(lane, s, e, p, T1, INNER)
        lo2, hi2 = column_interval(lane, s, e, p, T2, INNER)
        lo3, hi3 = column_interval(lane, s, e, p, T3, INNER)
    a0, b0 = tile_span(lo0, hi0, ok, BLOCK)
    a1, b1 = tile_span(lo1, hi1, ok, BLOCK)
    a2, b2 = tile_span(lo2, hi2, ok, BLOCK)
    a3, b3 = tile_span(lo3, hi3, ok, BLOCK)
    f0, g0 = full_span(lo0, hi0, ok, BLOCK)
    f1, g1 = full_span(lo1, hi1, ok, BLOCK)
    f2, g2 = full_span(lo2, hi2, ok, BLOCK)
    f3, g3 = full_span(lo3, hi3, ok, BLOCK)
    return (lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, a0, b0, a1, b1, a2, b2, a3, b3,
            f0, g0, f1, g1, f2, g2, f3, g3)


@triton.jit
def next_tile(t, a0, b0, a1, b1, a2, b2, a3, b3):
    """The first tile after t inside one of the spans [a, b) (2147483647 when none): a union of spans
    walked once, each tile once."""
    n = t + 1
    c = tl.where(b0 > n, tl.maximum(n, a0), 2147483647)
    c = tl.minimum(c, tl.where(b1 > n, tl.maximum(n, a1), 2147483647))
    c = tl.minimum(c, tl.where(b2 > n, tl.maximum(n, a2), 2147483647))
    c = tl.minimum(c, tl.where(b3 > n, tl.maximum(n, a3), 2147483647))
    return c


@triton.jit
def split_span(a, b, f, g):
    """(f', g') cutting the span [a, b) into a masked head [a, f'), a full middle [f', g') and a masked tail
    [g', b), given the full span [f, g) inside it (empty ones included: then f' = g')."""
    f = tl.minimum(tl.maximum(f, a), b)
    g = tl.minimum(tl.maximum(g, f), b)
    return f, g


@triton.jit
def inside(t, a, b):
    return (t >= a) & (t < b)


@triton.jit
def keep_keys(kc, lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, T0: tl.constexpr, T1: tl.constexpr,
              T2: tl.constexpr, T3: tl.constexpr):
    """[rows, keys]: key kc inside one of the rows' term intervals (the predicate of a partial tile)."""
    keep = (kc[None, :] >= lo0[:, None]) & (kc[None, :] < hi0[:, None])
    if T1[0] != 0:
        keep |= (kc[None, :] >= lo1[:, None]) & (kc[None, :] < hi1[:, None])
    if T2[0] != 0:
        keep |= (kc[None, :] >= lo2[:, None]) & (kc[None, :] < hi2[:, None])
    if T3[0] != 0:
        keep |= (kc[None, :] >= lo3[:, None]) & (kc[None, :] < hi3[:, None])
    return keep


@triton.jit
def keep_rows(rc, lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, T0: tl.constexpr, T1: tl.constexpr,
              T2: tl.constexpr, T3: tl.constexpr):
    """[rows, keys] from the keys' side: row rc inside one of the keys' term intervals of queries."""
    keep = (rc[:, None] >= lo0[None, :]) & (rc[:, None] < hi0[None, :])
    if T1[0] != 0:
        keep |= (rc[:, None] >= lo1[None, :]) & (rc[:, None] < hi1[None, :])
    if T2[0] != 0:
        keep |= (rc[:, None] >= lo2[None, :]) & (rc[:, None] < hi2[None, :])
    if T3[0] != 0:
        keep |= (rc[:, None] >= lo3[None, :]) & (rc[:, None] < hi3[None, :])
    return keep
