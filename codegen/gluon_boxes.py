"""The Gluon forward's per-dimension predicate on multi-dimensional grids ("boxes", maskdsl.analysis.gluon_rule):
why it exists and the schedule of a plan's mask in that mode.

`codegen.gluon_plan` admits masks whose visited tiles are all full, on grids the tiles divide. The
masks video and image users run most are neither: a neighborhood window without a stride
(NATTEN's NA) cuts tiles at every window edge, and a GNA window on a latent whose extent the tile
does not divide (HunyuanVideo at 720p is 30 x 45 x 80; Cosmos 16 x 44 x 80) shifts its last
group off the tiles and leaves a ragged tile. One product term of the mask is a box per row: in
every dimension d a row at coordinate x sees keys [lo_d(x), hi_d(x)] (`maskdsl.analysis.intervals`), so
its keys are the product of those intervals, and a query tile's visited key tiles are the product
of its per-dimension runs: one box, as the whole-tile mode wants. The predicate is then three
interval tests per score, read from 2 x (n0 + n1 + n2) integers, not from an [L, L] mask.

Which tiles get it: a key tile is full for a query tile when it is in every dimension (every row
of the query tile sees every key of the key tile there: `maskdsl.analysis.transpose.query_tile_ranges`' full
range), and only the others are masked; a key tile that overhangs the grid is never full (keys
past the extent are outside every row's interval, so the same test masks them). Rows past the
grid see nothing on masked tiles and nothing of theirs is stored.

Refused: head_dim other than 128 (`codegen.dispatch`), unions of several product terms (their keys per row
are not one box; a union whose tiles are all full runs the whole-tile mode), dilated layouts, more
than 3 dimensions, and 1-D token orders (`codegen.gluon_runs` has their predicate: intervals per
row, no box needed). Nothing here imports Gluon.
"""

from __future__ import annotations

from maskdsl.codegen.gluon_plan import plan_ranges
from maskdsl.codegen.plan import KernelPlan
from maskdsl.analysis.gluon_rule import GluonRanges
from maskdsl.analysis.tile_table import WIDTH

ROW = WIDTH["boxes"]  # table columns (maskdsl.analysis.tile_table)
BoxRanges = GluonRanges  # the "boxes" mode's schedule


def box_ranges(plan: KernelPlan, q_tile=None, kv_tile=None) -> GluonRanges:
    """The per-dimension predicated schedule of the plan's mask, or why it has none; tiles default to
    the config's (`maskdsl.analysis.gluon_rule.kernel_tiles`), a test passes its own."""
    return plan_ranges(plan, q_tile, kv_tile, ("boxes",))
