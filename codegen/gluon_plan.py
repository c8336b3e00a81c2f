"""What the Gluon forward (codegen.gluon_fwd) runs, as the tables a launch reads (which tensors and
devices it takes: codegen.dispatch). Nothing here imports Gluon, so the tables are checked (and
tested) on machines where the kernel cannot run.

Which mode runs a mask, and each query tile's key tiles in it, is maskdsl.analysis.gluon_rule's one rule
(the simulator costs the same answer). Here a plan's product terms go in (`plan_ranges`: their exact
row bounds, the numbers the Triton template is printed from) and the schedule comes out as the
kernel's row tables, written by maskdsl.analysis.tile_table's column names (`row_table`), copied to each
device once (`GluonSchedule`). `plan_ranges(plan, modes=(...))` asks the rule for some modes only (tests).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from maskdsl.analysis import tile_table as tt
from maskdsl.analysis.counts import Rel1D
from maskdsl.codegen.plan import KernelPlan
from maskdsl.analysis.gluon_rule import MODES, TILE, GluonRanges, gluon_ranges, segment_ranges
from maskdsl.analysis.gluon_rule import kernel_tiles as rule_tiles
from maskdsl.analysis.intervals import SymRel, evaluate
from maskdsl.analysis.tile_table import RANK

BLOCK_M = BLOCK_N = TILE
# Work items (query tile x head) visiting at most SHORT_ITEM key tiles on average run up to MAX_PER to a
# program (codegen.gluon_fwd: the next item's Q and K/V load under the current one). 4-tile and 16-tile
# items gain from it; items of 50+ tiles and the predicated modes do not (docs/BENCHMARKS.md).
SHORT_ITEM = 16
MAX_PER = 4


def plan_terms(plan: KernelPlan) -> list[tuple[Rel1D, ...]]:
    """The plan's product terms as the rule reads them: each dimension's exact per-row key bounds."""
    return [tuple(Rel1D(n, td.dilation, *evaluate(SymRel(td.dilation, td.lo, td.hi, td.qa, td.qb), n))
                  for td, n in zip(term, plan.shape)) for term in plan.terms]


def plan_ranges(plan: KernelPlan, q_tile=None, kv_tile=None, modes=MODES) -> GluonRanges:
    """The rule's schedule of the plan's mask at its config's tiles (`maskdsl.analysis.gluon_rule.kernel_tiles`),
    or at these tiles (tests); head_dim and dtype are the launch's to check."""
    given = q_tile is not None
    q_tile, kv_tile = (q_tile, kv_tile) if given else (plan.config.q_tile, plan.config.kv_tile)
    return gluon_ranges(plan_terms(plan), plan.shape, q_tile, kv_tile, modes=modes, as_given=given)


def kernel_tiles(plan: KernelPlan) -> tuple[tuple[int, ...], tuple[int, ...]] | str:
    """The (query, key) tiles the kernel runs the plan's mask with, or why none."""
    return rule_tiles(plan.shape, plan.config.q_tile, plan.config.kv_tile)


def row_table(ranges: GluonRanges) -> np.ndarray:
    """int32 [busy query tiles, tile_table.WIDTH[mode]] in dispatch order: the rows the kernel reads."""
    rows = ranges.order
    table = np.zeros((len(rows), tt.WIDTH[ranges.mode]), np.int64)
    coords = ranges.coords(rows)
    for d in range(RANK):
        table[:, tt.COORD + d] = coords[:, d]
        table[:, tt.box_lo(d)], table[:, tt.box_hi(d)] = ranges.lo[rows, d], ranges.hi[rows, d]
        if ranges.mode == "boxes":
            table[:, tt.full_lo(d)], table[:, tt.full_hi(d)] = ranges.full_lo[rows, d], ranges.full_hi[rows, d]
    if ranges.mode == "runs":
        table[:, tt.RUN2], table[:, tt.RUN2 + 1] = ranges.run2[rows, 0], ranges.run2[rows, 1]
        table[:, tt.FLAG] = ranges.flag[rows]
    return table.astype(np.int32)


class GluonSchedule:
    """A mask's schedule (maskdsl.analysis.gluon_rule) as the kernel reads it, copied to each device once.

    `table`: int32 rows in dispatch order (`row_table`), the kernel's grid; `idle_rows`: int64 token
    indices of the query tiles that visit nothing, filled with 0 / -inf apart; `bounds`: the
    predicated modes' per-row key bounds, else None.
    """

    def __init__(self, ranges: GluonRanges):
        self.ranges = ranges
        self.bounds = ranges.bounds if ranges.ok else None
        self.boxes = ranges.mode == "boxes"  # head_dim 128 only (maskdsl.analysis.gluon_rule.BOX_HEAD_DIMS)
        self.table = row_table(ranges) if ranges.ok else np.zeros((0, tt.WIDTH["whole"]), np.int32)
        self.idle_rows = ranges.rows(ranges.idle) if ranges.ok else np.zeros(0, np.int64)
        self._on: dict[torch.device, tuple] = {}
        self._segments: dict[tuple, tuple] = {}
        # whole tiles whose rows visit at most SHORT_ITEM key tiles on average (items_per_program)
        extents = np.stack([self.table[:, tt.box_hi(d)].astype(np.int64) - self.table[:, tt.box_lo(d)]
                            for d in range(RANK)], axis=1)
        self._short = ranges.mode == "whole" and len(self.table) > 0 and float(extents.prod(1).mean()) <= SHORT_ITEM

    @classmethod
    def of(cls, plan: KernelPlan) -> "GluonSchedule":
        """The schedule of the plan's mask in the first mode the rule gives it."""
        return cls(plan_ranges(plan))

    def items_per_program(self, items: int, sms: int) -> int:
        """Work items per Gluon program for `items` (table rows x batch x heads) on `sms` multiprocessors:
        1 unless every tile is whole and the items are short (`SHORT_ITEM` key tiles on average); then
        enough to fill the GPU once (one head at 32k: 256 items, 2 a program) up to `MAX_PER`.
        MASKDSL_GLUON_PER=k forces k (measurements)."""
        forced = os.environ.get("MASKDSL_GLUON_PER")
        if forced:
            return max(1, int(forced))
        if not self._short:
            return 1
        return max(1, min(MAX_PER, -(-items // sms)))

    def on(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(table, idle rows, bounds or None) on `device`."""
        device = torch.device(device)
        if device not in self._on:
            bounds = None if self.bounds is None else torch.from_numpy(self.bounds).to(device)
            self._on[device] = (torch.from_numpy(self.table).to(device), torch.from_numpy(self.idle_rows).to(device),
                                bounds)
        return self._on[device]

    def segment(self, q_rows: tuple[int, int], k_rows: tuple[int, int], device):
        """(table, idle rows, bounds, ranges) on `device` of rows [qa, qb) over a buffer of keys [ka, kb),
        predicated 1-D mode only (maskdsl.analysis.gluon_rule.segment_ranges); ranges is refused where the cut
        schedule does not qualify. Cached: a context-parallel rank runs the same few segments each step."""
        key = (q_rows, k_rows, torch.device(device))
        if key not in self._segments:
            r = segment_ranges(self.ranges, q_rows, k_rows)
            if r.ok:
                on = [torch.from_numpy(x).to(device) for x in (row_table(r), r.rows(r.idle), r.bounds)]
                self._segments[key] = (*on, r)
            else:
                self._segments[key] = (None, None, None, r)
        return self._segments[key]
