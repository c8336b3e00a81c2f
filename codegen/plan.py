"""What a kernel must do for one mask and config: the template's whole input, nothing more.

The mask becomes the analysis' union of product terms; each term contributes, per dimension,
printed Triton expressions for its key bounds lo(i)/hi(i) (dilation-group coordinates) and a
query range. The template turns these into closed-form key-tile loops per query tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from maskdsl.codegen.config import KernelConfig
from maskdsl import ir
from maskdsl.analysis import NotAnalyzable, products


class UnsupportedMask(ValueError):
    """The mask is valid but this kernel generator cannot run it (the reason says why)."""


@dataclass(frozen=True)
class DimPlan:
    extent: int
    stride: int  # row-major token stride of this dimension
    dilation: int
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
    """One dimension of one product term: its key bounds (sympy, group coordinates) and query range."""

    lo: sp.Expr
    hi: sp.Expr
    qa: int
    qb: int
    restricts_queries: bool


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
        raise UnsupportedMask(f"mask {mask.name!r} has a top-k part; dynamic masks use codegen.topk")
    shape = mask.layout.shape
    config.validate(len(shape))
    try:
        terms = products(mask.expr, shape)
    except NotAnalyzable as exc:
        raise UnsupportedMask(f"mask {mask.name!r}: {exc}") from None
    dilation = []
    for d in range(len(shape)):
        dil = {t.sym[d].dilation for t in terms}
        if len(dil) > 1:
            raise UnsupportedMask(
                f"mask {mask.name!r}: dimension {d} unites terms with dilations {sorted(dil)}; the kernel lays out "
                "one dilation per dimension", )
        dilation.append(dil.pop() if dil else 1)
    strides = []
    acc = 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    strides.reverse()
    dims = tuple(DimPlan(n, strides[d], dilation[d], config.q_tile[d], config.kv_tile[d]) for d, n in enumerate(shape))
    planned = [tuple(TermDim(rel.lo, rel.hi, rel.qa, rel.query_stop(n), rel.qa > 0 or rel.query_stop(n) < n)
                     for rel, n in zip(t.sym, shape)) for t in terms]
    shell_free = len(terms) == 1 and all(_shell_free(rel, n, dim) for rel, n, dim in zip(terms[0].sym, shape, dims))
    return KernelPlan(mask.name, mask.expr.fmt(), shape, dims, tuple(planned), config, shell_free)


def _shell_free(rel, n: int, dim: DimPlan) -> bool:
    """Whether, in this dimension, every query tile's visited key tiles are all fully seen.

    One term is a product over dimensions, so a tile pair is partial exactly when some dimension
    is; when no dimension can be, the kernel drops its predicate loops (perfectly block-sparse
    masks: blocked attention, GNA with tiles that divide the strides). Same tile arithmetic as
    the template, on the exact integer bounds of every row.
    """
    from maskdsl.intervals import evaluate

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
