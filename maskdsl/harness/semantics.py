"""The exact mask semantics (docs/DESIGN.md §3): the oracle that every other part is tested against.

Per dimension of extent n, a neighborhood with window w, dilation d, stride s and causal flag c
relates query coordinate i to key coordinate j as follows (NATTEN's rule, as written in
SHI-Labs/NATTEN src/natten/backends/flex.py `get_na_flex_mask` and
csrc/include/natten/cuda/reference/mask.hpp `get_win_start`/`get_win_end`; paraphrased):

* dilation: only keys with j mod d == i mod d; the rest runs on the group's own coordinates
  i' = i // d, j' = j // d, and group length n' = ceil((n - i mod d) / d);
* non-causal: leader = min(floor(i'/s)*s + s//2, n'-1) (for even s the right-hand centre),
  start = clamp(leader - w//2, 0, n' - w), keys start <= j' < start + w;
* causal: leader = min(floor(i'/s)*s + s - 1, n'-1) (the group's last query), keys
  max(0, leader - w + 1) <= j' <= i'. The lower bound follows the stride group's leader while
  the upper bound is the query itself, exactly as NATTEN does.

Even windows put w//2 keys on the left and w//2 - 1 on the right (before clamping), as
NATTEN's `window_size_right = w//2 + (w%2 - 1)`. These formulas are only claimed for w*d <= n,
which the language enforces (as NATTEN's checks do).

A multi-dimensional neighborhood attends iff every dimension does. Everything here is
written for clarity, not speed: it materializes [n, n] per dimension and [L, L] overall.
"""

from __future__ import annotations

import torch

from maskdsl.spec import ir


def neighborhood_rule(i, j, n: int, window: int, dilation: int = 1, stride: int = 1, causal: bool = False):
    """Whether query coordinate i sees key coordinate j in one dimension of extent n: the rule, once.

    Elementwise on integer tensors that broadcast (or 0-d ones: FlexAttention's `mask_mod` calls it
    per element under vmap and compiles it into its kernel), so tables and mask_mods share it.
    """
    group = i % dilation
    same_group = group == (j % dilation)
    gi, gj = i // dilation, j // dilation
    glen = (n - group + dilation - 1) // dilation
    if causal:
        leader = torch.minimum((gi // stride) * stride + stride - 1, glen - 1)
        seen = (gj <= gi) & (leader - gj < window)
    else:
        leader = torch.minimum((gi // stride) * stride + stride // 2, glen - 1)
        start = torch.clamp(leader - window // 2, min=0)
        start = torch.minimum(start, glen - window)
        seen = (gj >= start) & (gj < start + window)
    return same_group & seen


def neighborhood_1d(n: int, window: int, dilation: int = 1, stride: int = 1, causal: bool = False,
                    queries: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean [n, n]: entry (i, j) says whether query i sees key j in this one dimension.

    With `queries` (coordinates), only their rows: [len(queries), n].
    """
    i = (torch.arange(n) if queries is None else queries.to(torch.int64)).view(-1, 1)
    return neighborhood_rule(i, torch.arange(n).view(1, n), n, window, dilation, stride, causal)


def flat_coords(shape: tuple[int, ...], flat) -> list:
    """Per-dimension coordinates of row-major flat token indices."""
    coords = []
    for n in reversed(shape):
        coords.append(flat % n)
        flat = flat // n
    return coords[::-1]


def flat_index(shape: tuple[int, ...], coords) -> object:
    """The row-major flat token index of per-dimension coordinates (the inverse of `flat_coords`)."""
    flat = coords[0]
    for n, c in zip(shape[1:], coords[1:]):
        flat = flat * n + c
    return flat


def attends(expr: ir.MaskExpr, shape: tuple[int, ...], qc, kc, neighborhood=None):
    """Elementwise: does the query at coordinates `qc` see the key at `kc` (lists of broadcasting tensors)?

    The composition rules, once: a neighborhood holds in every dimension, `causal` compares
    row-major flat indices, `sink(n)` opens the first n tokens both ways, `|` and `&` combine.
    `neighborhood(expr, qc, kc)` may replace the per-dimension rule by an equivalent (a table lookup).
    """
    if isinstance(expr, ir.Neighborhood):
        if neighborhood is not None:
            return neighborhood(expr, qc, kc)
        out = None
        for d, n in enumerate(shape):
            m = neighborhood_rule(qc[d], kc[d], n, expr.window[d], expr.dilation[d], expr.stride[d], expr.causal[d])
            out = m if out is None else out & m
        return out
    if isinstance(expr, ir.TopK):
        raise ValueError(f"{expr.fmt()} depends on the data: pass q and k to build its mask")
    if isinstance(expr, (ir.Document, ir.Prefix)):
        raise ValueError(f"`{expr.fmt()}` depends on the offsets of a call: maskdsl.harness.documents.document_mask "
                         "builds its mask")
    qf, kf = flat_index(shape, qc), flat_index(shape, kc)
    if isinstance(expr, ir.Causal):
        return qf >= kf
    if isinstance(expr, ir.Full):
        return (qf >= 0) & (kf >= 0)
    if isinstance(expr, ir.Sink):
        return (qf < expr.n) | (kf < expr.n)
    if isinstance(expr, (ir.Union_, ir.Intersection)):
        parts = [attends(t, shape, qc, kc, neighborhood) for t in expr.terms]
        out = parts[0]
        for p in parts[1:]:
            out = (out | p) if isinstance(expr, ir.Union_) else (out & p)
        return out
    raise TypeError(f"not a mask expression: {expr!r}")


def static_mask(expr: ir.MaskExpr, shape: tuple[int, ...], rows: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean [L, L] over row-major tokens for a mask with no data-dependent part.

    With `rows` (flat query indices) only those rows are built: [len(rows), L], so a few rows of a
    115,200-token grid can be looked at without the full matrix. Neighborhoods look their
    per-dimension [n, n] tables up (`neighborhood_1d`) instead of redoing the arithmetic per pair.
    """
    tokens = 1
    for n in shape:
        tokens *= n
    keys = torch.arange(tokens)
    queries = keys if rows is None else rows.to(torch.int64)
    qc, kc = flat_coords(shape, queries.view(-1, 1)), flat_coords(shape, keys.view(1, -1))

    def tables(e, qc, kc):
        # only the query coordinates asked for: [Q, n] per dimension, not [n, n] (4 GB at n = 32k)
        out = torch.ones(len(queries), tokens, dtype=torch.bool)
        for d, n in enumerate(shape):
            rows_d = qc[d].flatten()
            table = neighborhood_1d(n, e.window[d], e.dilation[d], e.stride[d], e.causal[d], queries=rows_d)
            out &= table[torch.arange(len(rows_d)).view(-1, 1), kc[d]]
        return out

    return attends(expr, shape, qc, kc, tables)
