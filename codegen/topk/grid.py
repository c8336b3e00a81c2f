"""Where top-k blocks sit among the kernel's tiles, and the text the top-k templates print for it.

A top-k block is a box of the grid (maskdsl.harness.topk) and a kernel tile a box that divides it in
every dimension, so a block is a box of whole tiles: key block j holds the tiles
(bj_d * tpb_d + s_d) per dimension, where bj_d are j's block coordinates and s_d in [0, tpb_d).
The last block along a dimension may be cut by the grid; its tiles past the grid are skipped and
its ragged tile is masked like any tile that runs past the grid. Both top-k templates (forward
and backward) print their block and tile indices from here, so they agree by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from maskdsl.codegen.bounds import KernelDim
from maskdsl.codegen.plan import DimPlan, TermDim, UnsupportedMask
from maskdsl.analysis.counts import NotAnalyzable, products


@dataclass(frozen=True)
class TopKGrid:
    shape: tuple[int, ...]
    block: tuple[int, ...]  # the top-k block, per dimension
    tile: tuple[int, ...]  # the kernel's (query and key) tile, per dimension; divides `block`

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def blocks(self) -> tuple[int, ...]:
        return tuple(-(-n // b) for n, b in zip(self.shape, self.block))

    @property
    def tiles_per_block(self) -> tuple[int, ...]:
        return tuple(b // t for b, t in zip(self.block, self.tile))

    @property
    def tiles(self) -> tuple[int, ...]:
        return tuple(-(-n // t) for n, t in zip(self.shape, self.tile))

    @property
    def nblocks(self) -> int:
        return math.prod(self.blocks)

    @property
    def tpb(self) -> int:
        return math.prod(self.tiles_per_block)

    @property
    def tile_volume(self) -> int:
        return math.prod(self.tile)

    @property
    def cut(self) -> tuple[bool, ...]:
        """Per dimension: the last block holds whole tiles past the grid (the kernel skips them)."""
        return tuple(nb * b - n >= t for n, b, t, nb in zip(self.shape, self.block, self.tile, self.blocks))

    @property
    def exact(self) -> bool:
        """Blocks tile the grid exactly: no tile of a picked block is past the grid or ragged."""
        return all(n % b == 0 for n, b in zip(self.shape, self.block))

    def kernel_dims(self) -> list[KernelDim]:
        strides = [math.prod(self.shape[d + 1:]) for d in range(self.rank)]
        out = []
        for d, n in enumerate(self.shape):
            inner = math.prod(self.tile[d + 1:])
            out.append(KernelDim(d, DimPlan(n, strides[d], 1, self.tile[d], self.tile[d]), inner, inner))
        return out

    # --- text -------------------------------------------------------------------------------------

    def block_of_tiles(self, coord: str) -> str:
        """Flat block index of the block holding tile (coord_0, ..): row-major over the block grid."""
        parts = []
        for d in range(self.rank):
            c = f"{coord}_{d}" if self.tiles_per_block[d] == 1 else f"({coord}_{d} // {self.tiles_per_block[d]})"
            parts.append(_mul(c, math.prod(self.blocks[d + 1:])))
        return " + ".join(parts)

    def block_of_rows(self, first: str) -> str:
        """Flat block index of the query block holding the tile whose first coordinates are first_d."""
        return " + ".join(_mul(f"({first}_{d} // {self.block[d]})", math.prod(self.blocks[d + 1:]))
                          for d in range(self.rank))

    def tiles_of_pick(self, coord: str, kb: str, sub: str) -> list[str]:
        """Lines setting coord_d to the tile coordinates of sub-tile `sub` of block `kb`."""
        lines = []
        for d in range(self.rank):
            bj = _digit(kb, math.prod(self.blocks[d + 1:]), self.blocks[d], d == 0)
            tpb = self.tiles_per_block[d]
            if tpb == 1:
                lines.append(f"{coord}_{d} = {bj}")
            else:
                s = _digit(sub, math.prod(self.tiles_per_block[d + 1:]), tpb, d == 0)
                lines.append(f"{coord}_{d} = {_mul(bj if _atom(bj) else f'({bj})', tpb)} + {s}")
        return lines

    def past_grid(self, coord: str) -> str:
        """The tile lies wholly past the grid (a cut last block's extra tiles); "" if none can."""
        return " | ".join(f"({coord}_{d} >= {t})" for d, t in enumerate(self.tiles) if self.cut[d])

    def ragged(self, coord: str) -> str:
        """The tile runs past the grid in some dimension; "" if none does."""
        return " | ".join(f"({coord}_{d} == {t - 1})" for d, t in enumerate(self.tiles)
                          if self.shape[d] % self.tile[d])


def _mul(x: str, factor: int) -> str:
    return x if factor == 1 else f"{x} * {factor}"


def _atom(x: str) -> bool:
    return x.replace("_", "").isalnum()


def _digit(var: str, stride: int, extent: int, outer: bool) -> str:
    """Coordinate of row-major index `var` along a dimension of `extent` whose stride is `stride`."""
    if extent == 1:
        return "0"
    q = var if stride == 1 else f"{var} // {stride}"
    return q if outer else (f"{q} % {extent}" if stride == 1 else f"({q}) % {extent}")


def terms(expr, shape, what) -> list[tuple[TermDim, ...]]:
    """The product terms of a static part (S or R), per dimension; top-k kernels run undilated ones."""
    if expr is None:
        return []
    try:
        found = products(expr, shape)
    except NotAnalyzable as exc:
        raise UnsupportedMask(f"{what}: {exc}") from None
    if any(rel.dilation != 1 for t in found for rel in t.sym):
        raise UnsupportedMask(f"{what}: dilation is not supported together with top-k")
    return [tuple(TermDim.of(rel, n) for rel, n in zip(t.sym, shape)) for t in found]


def term_texts(mask, form, grid: "TopKGrid", temps) -> tuple[list, list]:
    """The printed bounds of S's and R's product terms (labels s0.., r0..) on the grid's kernel dims:
    what the top-k forward and backward templates both evaluate."""
    from maskdsl.codegen.bounds import term_text

    shape, dims = grid.shape, grid.kernel_dims()
    s_terms = [term_text(f"s{t}", term, dims, temps, full=True)
               for t, term in enumerate(terms(form.static, shape, f"mask {mask.name!r}, static part"))]
    r_terms = [term_text(f"r{t}", term, dims, temps, full=True)
               for t, term in enumerate(terms(form.restrict, shape, f"mask {mask.name!r}, top-k restriction"))]
    return s_terms, r_terms
