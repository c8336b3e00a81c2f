"""The Gluon forward's predicated 1-D mode ("runs", maskdsl.analysis.gluon_rule over maskdsl.analysis.row_runs): the
schedule of a plan's mask in that mode (a context-parallel segment's: maskdsl.analysis.gluon_rule.segment_ranges).

The whole-tile mode admits masks whose visited tiles are all full: no causal mask, no sliding
window whose edges cut a tile, no sink. Those are the masks LLM users run most, so the kernel also
has a predicated mode for 1-D token orders. Each row's attended keys are stored exactly as at most
`SLOTS` disjoint intervals (the union of the mask's product terms, merged per row: a causal window
plus sinks is two), each query tile of 128 rows walks at most `RUNS` runs of 128-key tiles, and
the kernel masks S on the first and last tile of each run. Every other tile of a run must be full
(every row sees every key of it); where one is not (the few query tiles where a window meets a
sink, or the sink's own rows that see everything), the table row's flag makes the kernel mask
every tile of that query tile: slower there, exact everywhere. Nothing here imports Gluon.
"""

from __future__ import annotations

import numpy as np

from maskdsl.codegen.gluon_plan import plan_ranges, plan_terms
from maskdsl.codegen.plan import KernelPlan
from maskdsl.analysis.gluon_rule import GluonRanges, row_key_intervals
from maskdsl.analysis.tile_table import WIDTH

ROW = WIDTH["runs"]  # table columns (maskdsl.analysis.tile_table)
RunRanges = GluonRanges  # the "runs" mode's schedule


def plan_intervals(plan: KernelPlan) -> np.ndarray | str:
    """The plan's rows' key intervals (`row_runs.row_intervals`) from its product terms, or why not."""
    return row_key_intervals(plan_terms(plan), plan.shape[-1])


def run_ranges(plan: KernelPlan) -> GluonRanges:
    """The predicated 1-D schedule of the plan's mask, or why it has none."""
    return plan_ranges(plan, modes=("runs",))
