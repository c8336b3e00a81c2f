"""GNA-style tile-schedule simulator: predicts what a tiled kernel visits, before any GPU runs.

    simulate(spec, mask, q_tile, kv_tile, permute=True) -> SimResult   exact tile counts, bounds, prediction
    sweep(spec, mask, candidates=None, limit=20)        -> [(TileConfig, SimResult)], best first
    suggest(spec, mask, q_tile, kv_tile)                -> [(Neighborhood, SimResult)], perfectly block-sparse
    default_config(spec, mask)                          -> the best 128-token tile, for when none is given
    CostModel.for_gpu(name, path=None)                  -> per-GPU cost constants (gpu_costs.json)

docs/SIMULATOR.md explains the model. Only maskdsl is imported from here, never codegen/autotune.
"""

from maskdsl.simulator.cost import CostModel
from maskdsl.simulator.ranking import TileConfig, default_config, sweep
from maskdsl.simulator.simulation import SimResult, simulate
from maskdsl.simulator.suggestions import suggest

__all__ = ["simulate", "SimResult", "sweep", "TileConfig", "default_config", "suggest", "CostModel"]
