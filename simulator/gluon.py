"""Whether Hopper's warp-specialized Gluon forward runs a mask, and in which mode: maskdsl.analysis.gluon_rule's
verdict, which codegen builds the kernel's tables from, so a prediction is for the kernel that runs.

The simulator only costs it (`simulator.simulation`): the whole-tile mode's tiles as full ones, the
"runs" mode's tiles as full ones too (its predicate is a few integer compares on a run's edge
tiles) in the kernel's dispatch order, the "boxes" mode's partial tiles with the template's
predicate premium on top of the Gluon tile (`simulator.cost`). What the rule cannot know from the
mask alone the simulator states here: a top-k mask runs the template's predicate loop, and
row-major tiles (--no-permute) are not boxes of a grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from maskdsl.spec import ir
from maskdsl.analysis.counts import num_products
from maskdsl.analysis.gluon_rule import dtype_name, gluon_ranges, kernel_tiles
from maskdsl.analysis.tile_table import PREDICATED


@dataclass(frozen=True)
class GluonPlan:
    """The kernel's tiles and mode when it runs the mask, else why not (`reason`)."""

    q_tile: tuple[int, ...] = ()
    kv_tile: tuple[int, ...] = ()
    reason: str | None = None
    mode: str | None = None  # maskdsl.analysis.tile_table.MODES

    @property
    def eligible(self) -> bool:
        return self.reason is None

    @property
    def predicated(self) -> bool:
        """A mode with a predicate: 1-D runs or per-dimension boxes."""
        return self.mode in PREDICATED


def gluon_plan(expr: ir.MaskExpr, shape, q_tile, kv_tile, permute: bool = True, head_dim: int = 128,
               dtype: str = "bf16", dynamic: bool = False) -> GluonPlan:
    """Whether the Gluon forward runs `expr` on `shape` with this config, in which mode (module docstring)."""
    if dynamic:
        return GluonPlan(reason="a top-k mask runs the template's predicate loop")
    shape = tuple(int(n) for n in shape)
    tiles = kernel_tiles(shape, tuple(q_tile), tuple(kv_tile))
    if isinstance(tiles, str):  # before the terms: most of a sweep's pairs stop here
        return GluonPlan(reason=tiles)
    return _verdict(expr, shape, *tiles, permute, head_dim, dtype_name(dtype))


@lru_cache(maxsize=1024)
def _verdict(expr, shape, q_tile, kv_tile, permute, head_dim, dtype) -> GluonPlan:
    """Cached per kernel tiles: on a 1-D order every config of a sweep runs the kernel's own."""
    r = gluon_ranges([t.num for t in num_products(expr, shape)], shape, q_tile, kv_tile, head_dim, dtype,
                     tile_major=permute, as_given=True)
    return GluonPlan(q_tile, kv_tile, r.reason, r.mode)
