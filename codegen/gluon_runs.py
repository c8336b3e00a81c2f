"""The Gluon forward's predicated 1-D mode ("runs", maskdsl.gluon_rule over maskdsl.row_runs): the
schedule of a plan's mask in that mode, and of a context-parallel segment's rows over its buffer.

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
from maskdsl.gluon_rule import GluonRanges, row_key_intervals, runs_of_intervals
from maskdsl.row_runs import EMPTY
from maskdsl.tile_table import WIDTH

ROW = WIDTH["runs"]  # table columns (maskdsl.tile_table)
RunRanges = GluonRanges  # the "runs" mode's schedule


def plan_intervals(plan: KernelPlan) -> np.ndarray | str:
    """The plan's rows' key intervals (`row_runs.row_intervals`) from its product terms, or why not."""
    return row_key_intervals(plan_terms(plan), plan.shape[-1])


def run_ranges(plan: KernelPlan) -> GluonRanges:
    """The predicated 1-D schedule of the plan's mask, or why it has none."""
    return plan_ranges(plan, modes=("runs",))


def segment_ranges(whole: GluonRanges, q_rows: tuple[int, int], k_rows: tuple[int, int]) -> GluonRanges:
    """The schedule of rows [qa, qb) over a buffer holding keys [ka, kb) of the grid (context
    parallelism's segments): the whole grid's row intervals cut to the buffer, in its coordinates."""
    (qa, qb), (ka, kb) = q_rows, k_rows
    lo = whole.bounds[:, 0, qa:qb].T.astype(np.int64) - ka  # [rows, SLOTS]
    hi = whole.bounds[:, 1, qa:qb].T.astype(np.int64) - ka
    lo, hi = np.maximum(lo, 0), np.minimum(hi, kb - ka - 1)
    empty = lo > hi
    iv = np.stack([np.where(empty, EMPTY[0], lo), np.where(empty, EMPTY[1], hi)], axis=2)
    return runs_of_intervals(iv, kb - ka)
