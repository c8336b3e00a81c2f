"""What a kernel must do for one mask and config: the template's whole input, nothing more.

The mask becomes the analysis' union of product terms; each term contributes, per dimension,
its key bounds lo(i)/hi(i) (sympy, dilation-group coordinates) and a query range. The layout,
each dimension's dilation included, is the analysis' (`layout_dilation`), the one the simulator
counts with. codegen.bounds prints the bounds; the template turns them into key-tile loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sympy as sp

from maskdsl.codegen.config import KernelConfig
from maskdsl.spec import ir
from maskdsl.analysis.counts import NotAnalyzable, layout_dilation, products


class UnsupportedMask(ValueError):
    """The mask is valid but this kernel generator cannot run it (the reason says why)."""


@dataclass(frozen=True)
class DimPlan:
    extent: int
    stride: int  # row-major token stride of this dimension
    dilation: int  # of the layout: query tiles are cut per dilation group
    q_tile: int
    kv_tile: int

    @property
    def group_len_max(self) -> int:
        return -(-self.extent // self.dilation)

    @property
    def q_tiles_per_group(self) -> int:
        return -(-self.group_len_max // self.q_tile)

    @property
    def q_tiles(self) -> int:
        return self.dilation * self.q_tiles_per_group


@dataclass(frozen=True)
class TermDim:
    """One dimension of one product term: its key bounds (sympy, group coordinates of its own
    dilation) and the original coordinates [qa, qb) of the queries it applies to."""

    lo: sp.Expr
    hi: sp.Expr
    qa: int
    qb: int
    restricts_queries: bool
    dilation: int = 1  # the term's; the layout's may be 1 where terms differ (codegen.bounds: "strided")

    @classmethod
    def of(cls, rel, n: int) -> "TermDim":
        qb = rel.query_stop(n)
        return cls(rel.lo, rel.hi, rel.qa, qb, rel.qa > 0 or qb < n, rel.dilation)


@dataclass(frozen=True)
class KernelPlan:
    mask_name: str
    mask_text: str
    shape: tuple[int, ...]
    dims: tuple[DimPlan, ...]
    terms: tuple[tuple[TermDim, ...], ...]
    config: KernelConfig
    shell_free: bool = False  # one term whose visited tiles are all full: no partial-tile loops at all

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def full_box(self) -> bool:
        """Whether term 0 (the dominant one, `build_plan`) runs its fully-seen tiles without a predicate.

        A tile every row of term 0 sees entirely is fully seen by the union too. A term whose
        dilation differs from the layout's in some dimension ("strided") has no such tiles.
        """
        return all(td.dilation == dp.dilation for td, dp in zip(self.terms[0], self.dims))

    @property
    def tma_ok(self) -> bool:
        """Tiles are boxes of memory (no dilation) within the copy engine's five dimensions."""
        return self.rank <= 3 and all(d.dilation == 1 for d in self.dims)

    @property
    def q_tiles(self) -> int:
        total = 1
        for d in self.dims:
            total *= d.q_tiles
        return total


def build_plan(mask: ir.MaskDef, config: KernelConfig) -> KernelPlan:
    if mask.dynamic:
        raise UnsupportedMask(f"mask {mask.name!r} has a top-k part; dynamic masks use codegen.topk.forward")
    shape = mask.layout.shape
    config.validate(len(shape))
    try:
        terms = products(mask.expr, shape)
    except NotAnalyzable as exc:
        raise UnsupportedMask(f"mask {mask.name!r}: {exc}") from None
    dilation = layout_dilation(terms, len(shape))
    strides = []
    acc = 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    strides.reverse()
    dims = tuple(DimPlan(n, strides[d], dilation[d], config.q_tile[d], config.kv_tile[d]) for d, n in enumerate(shape))
    terms = _dominant_first(terms, dilation)
    planned = [tuple(TermDim.of(rel, n) for rel, n in zip(t.sym, shape)) for t in terms]
    shell_free = len(terms) == 1 and all(_shell_free(rel, n, dim) for rel, n, dim in zip(terms[0].sym, shape, dims))
    return KernelPlan(mask.name, mask.expr.fmt(), shape, dims, tuple(planned), config, shell_free)


def _dominant_first(terms: list, dilation: tuple[int, ...]) -> list:
    """The terms with the one attending most pairs first (the others keep their order).

    The kernel runs term 0 like a single-term mask (its full box unmasked and pipelined, 2 x rank
    slabs around it) and the others only on what term 0's box leaves, so term 0 should carry most
    of the work. A term aligned with the layout in every dimension comes before a strided one:
    only an aligned term has full tiles. Pairs per term are exact: a product's count is the
    product of its dimensions' counts.
    """
    if len(terms) < 2:
        return terms

    def weight(t):
        aligned = all(rel.dilation == d for rel, d in zip(t.sym, dilation))
        pairs = 1
        for r in t.num:
            pairs *= int(np.clip(r.hi - r.lo + 1, 0, None).sum())
        return (aligned, pairs)

    best = max(range(len(terms)), key=lambda k: weight(terms[k]))  # the first of equals: stable
    return [terms[best]] + terms[:best] + terms[best + 1:]


def _shell_free(rel, n: int, dim: DimPlan) -> bool:
    """Whether, in this dimension, every query tile's visited key tiles are all fully seen.

    One term is a product over dimensions, so a tile pair is partial exactly when some dimension
    is; when no dimension can be, the kernel drops its predicate loops (perfectly block-sparse
    masks: blocked attention, GNA with tiles that divide the strides). Same tile arithmetic as
    the template, on the exact integer bounds of every row.
    """
    from maskdsl.analysis.intervals import evaluate

    lo, hi = evaluate(rel, n)
    d, qt, kt = dim.dilation, dim.q_tile, dim.kv_tile
    for g in range(d):
        glo, ghi = lo[g::d], hi[g::d]
        for start in range(0, len(glo), qt):
            rlo, rhi = glo[start:start + qt], ghi[start:start + qt]
            seen = rlo <= rhi
            if not seen.any():
                continue
            if not seen.all():
                return False
            a, b = int(rlo.min()) // kt, int(rhi.max()) // kt
            flo, fhi = int(rlo.max()), int(rhi.min())
            if flo > fhi or -(-flo // kt) != a or (fhi + 1) // kt - 1 != b:
                return False
    return True


def tile_rows(plan: KernelPlan, tile: int) -> list[int]:
    """Flat (row-major) token indices of the valid rows of query tile `tile`, as the kernel orders them."""
    coords = []
    rem = tile
    for dim in reversed(plan.dims):
        qt = rem % dim.q_tiles
        rem //= dim.q_tiles
        g, first = qt // dim.q_tiles_per_group, (qt % dim.q_tiles_per_group) * dim.q_tile
        glen = (dim.extent - g + dim.dilation - 1) // dim.dilation
        coords.append([g + dim.dilation * t for t in range(first, min(first + dim.q_tile, glen))])
    coords.reverse()
    rows = [0]
    for dim, cs in zip(plan.dims, coords):
        rows = [r + c * dim.stride for r in rows for c in cs]
    return rows
