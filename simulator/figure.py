"""Tile maps: which (query tile, key tile) pairs a kernel skips, runs unmasked, or runs masked.

    python -m maskdsl.simulator.figure docs/simulator_tilemap.png      # the figure in docs/SIMULATOR.md

Each panel is the [query tiles, key tiles] grid of one configuration, colored empty / partial /
full from the exact counts (``simulator.counting.tile_pair_counts``), so it is for small grids.
"""

from __future__ import annotations

import sys

import numpy as np

from maskdsl.lang.parser import parse
from maskdsl.simulator.counting import layout_for, tile_pair_counts
from maskdsl.simulator.simulation import simulate
from maskdsl.lang.parser import as_spec

COLORS = ("#f4f4f4", "#f0a35e", "#2d6a9f")  # empty, partial, full
DOCS_SPEC = """\
layout image = grid(24, 24)
mask local   = neighborhood(window=9)
mask wide    = neighborhood(window=12)
mask gna     = neighborhood(window=12, stride=4)   # stride = tile: what --suggest proposes for 4x4 tiles
"""

def tile_classes(spec, mask: str, q_tile, kv_tile=None, permute: bool = True) -> np.ndarray:
    """[NQ, NK] int: 0 empty, 1 partial (needs the mask predicate), 2 full."""
    spec = as_spec(spec)
    mdef = spec.mask(mask)
    kv_tile = q_tile if kv_tile is None else kv_tile
    counts = tile_pair_counts(mdef.expr, mdef.layout.shape, q_tile, kv_tile, permute)
    qs, ks = layout_for(mdef.expr, mdef.layout.shape, q_tile, kv_tile, permute).sizes()
    return np.where(counts == 0, 0, np.where(counts == np.multiply.outer(qs, ks), 2, 1))


def draw_tilemaps(spec, panels, out_path: str, title: str | None = None) -> str:
    """One tile map per (mask, q_tile, kv_tile) panel, side by side, written to `out_path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    spec = as_spec(spec)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 5.4), squeeze=False)
    for ax, (mask, q_tile, kv_tile) in zip(axes[0], panels):
        classes = tile_classes(spec, mask, q_tile, kv_tile)
        r = simulate(spec, mask, q_tile, kv_tile)
        ax.imshow(classes, cmap=ListedColormap(COLORS), vmin=0, vmax=2, interpolation="nearest")
        ax.set_title(f"{spec.mask(mask).expr.fmt()}\n{'x'.join(map(str, q_tile))} tiles: "
                     f"{r.visited_tiles} visited ({r.full_tiles} full)\nupper bound {r.upper_bound_speedup:.2f}x, "
                     f"FLOP-ideal {r.flop_ideal_speedup:.2f}x", fontsize=8.5)
        ax.set_xlabel("key tile")
        ax.set_ylabel("query tile")
    handles = [Patch(color=c, label=label) for c, label in zip(COLORS, ("empty (skipped)", "partial (masked)",
                                                                        "full (no mask)"))]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False, fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97 if title else 1))
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def draw_docs_figure(out_path: str = "docs/simulator_tilemap.png") -> str:
    """The figure of docs/SIMULATOR.md: a 24x24 grid, 4x4 tiles, three neighborhoods."""
    spec = parse(DOCS_SPEC, filename="<simulator.figure>")
    panels = [(name, (4, 4), (4, 4)) for name in ("local", "wide", "gna")]
    return draw_tilemaps(spec, panels, out_path, title="tile maps of a 24x24 grid in 4x4 tiles (tile-major order)")


if __name__ == "__main__":
    print(f"wrote {draw_docs_figure(*sys.argv[1:2])}")
