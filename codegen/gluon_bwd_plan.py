"""What the Gluon backward (codegen.gluon_bwd) runs, as the tables a launch reads. Nothing here imports
Gluon, so the tables are checked (and tested) on machines where the kernel cannot run.

The backward walks key tiles: one program per (busy key tile, query head), over the query tiles
that visit its key tile. That is the forward's whole-tile schedule transposed
(`maskdsl.analysis.gluon_rule.key_tile_visits`), written as two int32 tables:

* the key table, one row per key tile that some query tile visits, longest first (the programs
  with the most query tiles start first, so the last wave is short ones): KEY_COORD + d the key
  tile's coordinate in dimension d, then FIRST, LAST, its visitors' rows [FIRST, LAST) of
* the visit table, one row per (key tile, query tile) pair grouped by key tile, query tiles
  ascending within a key tile (neighbouring programs of a head read the same Q and dO from L2):
  VISIT_COORD + d the query tile's coordinate in dimension d.

Key tiles no query tile visits get dK = dV = 0 apart (`idle_rows`), as query tiles that visit
nothing get dQ = 0 (their rows of the fp32 accumulator are never added to).
"""

from __future__ import annotations

import numpy as np
import torch

from maskdsl.analysis.gluon_rule import GluonRanges, key_tile_visits
from maskdsl.analysis.tile_table import RANK

KEY_COORD = 0
FIRST = KEY_COORD + RANK
LAST = FIRST + 1
KEY_WIDTH = LAST + 1
VISIT_COORD = 0
VISIT_WIDTH = VISIT_COORD + RANK


class GluonBackwardSchedule:
    """A whole-tile schedule transposed for the backward, copied to each device once.

    `keys`: int32 [busy key tiles, KEY_WIDTH] in dispatch order; `visits`: int32 [pairs, VISIT_WIDTH];
    `idle_rows`: int64 token indices of the key tiles no query tile visits; `pairs`: (key tile,
    query tile) pairs, the work of one head.
    """

    def __init__(self, ranges: GluonRanges):
        if not ranges.ok or ranges.mode != "whole":
            raise ValueError(f"the Gluon backward runs whole-tile schedules; this one: {ranges.mode or ranges.reason}")
        self.ranges = ranges
        visits = key_tile_visits(ranges)
        count = np.diff(visits.offsets)
        busy = np.nonzero(count)[0]
        order = busy[np.argsort(-count[busy], kind="stable")]  # longest first, ties in tile order
        self.keys = np.zeros((len(order), KEY_WIDTH), np.int64)
        key_coords = np.stack(np.unravel_index(order, visits.k_tiles), axis=1) if len(order) else np.zeros((0, RANK))
        self.keys[:, KEY_COORD:KEY_COORD + RANK] = key_coords
        self.keys[:, FIRST], self.keys[:, LAST] = visits.offsets[order], visits.offsets[order + 1]
        self.keys = self.keys.astype(np.int32)
        self.visits = np.zeros((len(visits.q), VISIT_WIDTH), np.int32)
        self.visits[:, VISIT_COORD:VISIT_COORD + RANK] = ranges.coords(visits.q)
        self.pairs = len(visits.q)
        self.idle_rows = _tile_rows(np.nonzero(count == 0)[0], visits.k_tiles, ranges.kv_tile, ranges.shape)
        self._on: dict[torch.device, tuple] = {}

    def on(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, visits, idle rows) on `device`."""
        device = torch.device(device)
        if device not in self._on:
            self._on[device] = tuple(torch.from_numpy(np.ascontiguousarray(x)).to(device)
                                     for x in (self.keys, self.visits, self.idle_rows))
        return self._on[device]


def _tile_rows(tiles: np.ndarray, grid: tuple[int, ...], tile: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """Flat token indices of the rows of these tiles (flat over `grid`) of a grid `shape` they divide."""
    if len(tiles) == 0:
        return np.zeros(0, np.int64)
    offsets = np.stack(np.unravel_index(np.arange(int(np.prod(tile))), tile), axis=1)
    coords = np.stack(np.unravel_index(tiles, grid), axis=1)
    rows = (coords[:, None, :] * np.array(tile) + offsets[None]).reshape(-1, len(shape))
    return np.sort(np.ravel_multi_index(tuple(rows.T), shape)).astype(np.int64)
