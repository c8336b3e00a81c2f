"""`sweep`: every tile configuration a kernel could use, ranked; `default_config`: the one to start from.

Candidate tiles have power-of-two extents and 16..256 tokens (the BLOCK_M / BLOCK_N a Triton
kernel can take), extents capped at the next power of two above the grid extent. Query and key
tiles are chosen independently. Ranking is by the GNA upper bound, then the predicted speedup,
then the larger tile pair (fewer programs for the same schedule).

Ranking is cheap for static masks on tile-major layouts: the visited-tile total comes from the
term supports (``simulator.support``) in microseconds per config; only the best `limit` configs
are simulated in full. Top-k masks and row-major layouts are simulated config by config; with
``permute=False`` only the tile volume matters, so one tile per volume is tried.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product

from maskdsl.analysis.counts import NotAnalyzable
from maskdsl.simulator.cost import CostModel
from maskdsl.simulator.simulation import SimResult, simulate
from maskdsl.simulator.support import SupportCounter
from maskdsl.simulator.tiles import MAX_TILE_TOKENS, MIN_TILE_TOKENS, candidate_tiles, check_tile
from maskdsl.analysis.tiles import split
from maskdsl.lang.parser import as_spec


@dataclass(frozen=True)
class TileConfig:
    """One point of the search space: query tile, key tile, token permutation."""

    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    permute: bool = True

    @property
    def q_tokens(self) -> int:
        return math.prod(self.q_tile)

    @property
    def kv_tokens(self) -> int:
        return math.prod(self.kv_tile)

    def label(self) -> str:
        x = "x".join
        return f"q {x(map(str, self.q_tile))} / kv {x(map(str, self.kv_tile))}" + ("" if self.permute else " (row-major)")


def sweep(spec, mask: str, candidates=None, permute: bool = True, limit: int | None = 20,
          gpu: str | None = None, costs=None, q_tokens: int | None = None, kv_tokens: int | None = None,
          min_tokens: int = MIN_TILE_TOKENS, max_tokens: int = MAX_TILE_TOKENS) -> list[tuple[TileConfig, SimResult]]:
    """The best `limit` configs (all with limit=None), best first, each with its SimResult.

    `candidates`: (q_tile, kv_tile) pairs to rank instead of the generated ones. `q_tokens` /
    `kv_tokens` keep one BLOCK_M / BLOCK_N only (e.g. the autotuner asking per block size).
    """
    spec = as_spec(spec)
    mdef = spec.mask(mask)
    shape = mdef.layout.shape
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of configs, got {limit}")
    # finest first: coarser per-dimension tables are then block sums of cached ones (simulator.tables)
    configs = sorted(_configs(shape, candidates, permute, q_tokens, kv_tokens, min_tokens, max_tokens),
                     key=lambda c: (c.q_tokens * c.kv_tokens, c.q_tile, c.kv_tile))
    if not configs:
        raise ValueError(f"no tile configuration of {min_tokens}..{max_tokens} tokens fits grid {shape} "
                         f"(q_tokens={q_tokens}, kv_tokens={kv_tokens}); hint: widen min_tokens/max_tokens")
    model = costs if isinstance(costs, CostModel) else CostModel.for_gpu(gpu, costs)

    def run(c: TileConfig) -> SimResult:
        return simulate(spec, mask, c.q_tile, c.kv_tile, c.permute, costs=model)

    bounds = None
    if permute and not mdef.dynamic:
        try:
            counter = SupportCounter(mdef.expr, shape)
            bounds = {}
            for c in configs:
                visited, dense = counter.visited(c.q_tile, c.kv_tile)
                bounds[c] = dense / visited if visited else math.inf
        except NotAnalyzable:
            bounds = None  # too many overlapping terms to rank from supports: simulate each
    if bounds is None:
        results = {c: run(c) for c in configs}
    else:
        ranked = sorted(configs, key=lambda c: (-bounds[c], -c.q_tokens * c.kv_tokens))
        keep = len(ranked) if limit is None else min(len(ranked), limit)
        cut = bounds[ranked[keep - 1]]
        while keep < len(ranked) and keep < 4 * (limit or 1) and bounds[ranked[keep]] == cut:
            keep += 1  # ties at the cut are decided by the predicted speedup
        results = {c: run(c) for c in ranked[:keep]}
    order = sorted(results, key=lambda c: (-results[c].upper_bound_speedup, -results[c].predicted_speedup,
                                           -c.q_tokens * c.kv_tokens, c.q_tile, c.kv_tile))
    order = order if limit is None else order[:limit]
    return [(c, results[c]) for c in order]


def _configs(shape, candidates, permute, q_tokens, kv_tokens, min_tokens, max_tokens) -> list[TileConfig]:
    if candidates is not None:
        out = []
        for pair in candidates:
            try:
                q, k = pair
            except (TypeError, ValueError):
                raise ValueError(f"candidates must be (q_tile, kv_tile) pairs, got {pair!r}") from None
            out.append(TileConfig(check_tile(q, shape, "q_tile"), check_tile(k, shape, "kv_tile"), permute))
        return list(dict.fromkeys(out))
    tiles = candidate_tiles(shape, min_tokens, max_tokens)
    if not permute:  # row-major tiles are V consecutive tokens: only the volume matters
        tiles = list(dict.fromkeys((1,) * (len(shape) - 1) + (math.prod(t),) for t in tiles))
    qs = [t for t in tiles if q_tokens is None or math.prod(t) == q_tokens]
    ks = [t for t in tiles if kv_tokens is None or math.prod(t) == kv_tokens]
    return [TileConfig(q, k, permute) for q, k in product(qs, ks)]


def default_config(spec, mask: str, permute: bool = True, tokens: int = 128, gpu: str | None = None,
                   costs=None) -> tuple[TileConfig, SimResult]:
    """The best config whose query and key tiles are the same `tokens`-token box (GNA's setting)."""
    spec = as_spec(spec)
    shape = spec.mask(mask).layout.shape
    tiles = candidate_tiles(shape, tokens, tokens) or [split(tokens, shape)]  # a grid smaller than the tile
    if not permute:
        tiles = [(1,) * (len(shape) - 1) + (math.prod(tiles[0]),)]
    return sweep(spec, mask, candidates=[(t, t) for t in tiles], permute=permute, limit=1, gpu=gpu, costs=costs)[0]
