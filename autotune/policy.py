"""Which config a mask gets when nobody tuned it, forward and backward: the one policy above the kernels.

The forward (`ranked_default`, what `maskdsl.compile` and the tuner's yardstick use):

1. a top-k mask keeps its kernel's own tile (codegen.config.topk_default_config);
2. on Hopper, the 128 x 128-token pair the simulator predicts fastest among those the Gluon forward
   takes, where it is predicted faster than every template pair (`gluon_config`);
3. else the simulator's best tile pair at the untuned block sizes (`ranked_tiles`), with the untuned
   warps and stages;
4. where the simulator cannot rank, codegen's untuned config (codegen.config.default_config).

The backward (`ranked_backward_default`) takes the simulator's best tiles at each backward kernel's
untuned block sizes. `rank_candidates` are the fixed configs a benchmark times beside these.

Mechanism stays below: the config classes and the untuned configs codegen compiles with when given
none are codegen.config's, the tile factorization and the launch-knob rules maskdsl.analysis.tiles', the
ranking the simulator's. Device-independent except `hopper`.
"""

from __future__ import annotations

import math
from functools import lru_cache

from maskdsl.spec import ir
from maskdsl.codegen.config import BackwardConfig, KernelConfig, default_backward_config
from maskdsl.analysis.tiles import clip


@lru_cache(maxsize=256)
def ranked_tiles(mask: ir.MaskDef, q_tokens: int, kv_tokens: int):
    """The simulator's best (q_tile, kv_tile) at these block sizes, or None when it cannot rank them."""
    from maskdsl.analysis.counts import NotAnalyzable
    from maskdsl.simulator import sweep

    spec = ir.Spec(layouts=(mask.layout,), masks=(mask,))
    try:
        ranked = sweep(spec, mask.name, q_tokens=q_tokens, kv_tokens=kv_tokens, limit=1)
    except (ValueError, NotAnalyzable):
        return None
    return (ranked[0][0].q_tile, ranked[0][0].kv_tile) if ranked else None


@lru_cache(maxsize=256)
def gluon_pair(mask: ir.MaskDef, head_dim: int = 128,
               attention: ir.Attention | None = None) -> tuple[KernelConfig, bool] | None:
    """(the 128 x 128-token config the simulator predicts fastest among those the Gluon forward takes,
    whether it is also predicted faster than every template pair), or None when the kernel takes none.
    Device-independent.

    Not just the top of the ranking: that orders by the GNA bound first, and a ragged pair can have
    the higher bound while it costs more (Cosmos 16x44x80: the top pair tiles 44 by 8; 4 x 4 x 8
    tiles divide it and run the whole-tile mode). The predictions cost each pair on the path it
    would take, so comparing them is the fair choice; with the `attention` (heads, batch) they see
    its waves too (one head of Cosmos ranks a ragged pair first that 16 heads do not).
    """
    from maskdsl.analysis.counts import NotAnalyzable
    from maskdsl.analysis.gluon_rule import GLUON_HEAD_DIMS
    from maskdsl.simulator import sweep

    if mask.dynamic or head_dim not in GLUON_HEAD_DIMS:
        return None
    try:
        spec = ir.Spec(layouts=(mask.layout,), masks=(mask,), attentions=(attention,) if attention else ())
        ranked = sweep(spec, mask.name, q_tokens=128, kv_tokens=128, limit=None)
    except (ValueError, NotAnalyzable):
        return None
    if not ranked:
        return None
    best = max(res.predicted_speedup for _, res in ranked)
    for tiles, res in sorted(ranked, key=lambda r: -r[1].predicted_speedup):
        if res.gluon:  # the simulator costs maskdsl.analysis.gluon_rule's verdict, the one codegen builds tables from
            return KernelConfig(tiles.q_tile, tiles.kv_tile, 8, 3), res.predicted_speedup >= best
    return None


def gluon_config(mask: ir.MaskDef, head_dim: int = 128, attention: ir.Attention | None = None) -> KernelConfig | None:
    """`gluon_pair`'s config when it is predicted faster than every template pair, else None: the
    untuned default on Hopper."""
    pair = gluon_pair(mask, head_dim, attention)
    return pair[0] if pair is not None and pair[1] else None


def hopper() -> bool:
    """Whether kernels compiled here will run the Gluon forward (a Hopper GPU, not the interpreter)."""
    import torch

    from maskdsl.codegen.dispatch import device_blocker

    return torch.cuda.is_available() and device_blocker(torch.device("cuda", torch.cuda.current_device())) is None


def ranked_default(mask: ir.MaskDef, head_dim: int = 128, attention: ir.Attention | None = None,
                   on_hopper: bool | None = None) -> KernelConfig:
    """The config `compile` uses when nothing is tuned: on Hopper `gluon_config` where there is one,
    else the simulator's best tile pair at the untuned block sizes, with the untuned warps and stages.
    `on_hopper` asks as if the kernels ran (or did not run) on Hopper; None: this machine (`hopper`).

    The fixed untuned tile (a near-cube) is far from the best on masks with a preferred tile shape
    (docs/BENCHMARKS.md: the 3-D GNA example). Ranking is analytical (well under a second), so a
    user who never tunes still gets the tile pair the simulator would seed a study with.
    """
    from maskdsl.codegen.build import untuned_config

    base = untuned_config(mask, head_dim)
    if hopper() if on_hopper is None else on_hopper:
        gluon = gluon_config(mask, head_dim, attention)  # the warp-specialized forward beats the template's best tiles
        if gluon is not None:
            return gluon
    tiles = None if mask.dynamic else ranked_tiles(mask, base.block_m, base.block_n)
    return base if tiles is None else KernelConfig(*tiles, base.num_warps, base.num_stages)


def ranked_backward_default(mask: ir.MaskDef, head_dim: int = 128):
    """The backward's untuned config: codegen's block sizes, warps and stages with the simulator's best
    tiles for each kernel. A (query tile, key tile) pair is full or partial whichever kernel walks it,
    so the forward's ranking serves the transposed walk too (near-cubic tiles cut a strided
    neighborhood's groups and leave most pairs partial).
    """
    base = default_backward_config(mask, head_dim)
    kernels = []
    for cfg in (base.dkdv, base.dq):
        tiles = ranked_tiles(mask, cfg.block_m, cfg.block_n)
        kernels.append(cfg if tiles is None else KernelConfig(*tiles, cfg.num_warps, cfg.num_stages))
    return BackwardConfig(*kernels)


# Configs that measured best per grid rank (docs/history/BENCHMARKS-log.md, the tuned suite runs):
# (query tile, key tile, warps, stages), clipped to the grid by `rank_candidates`.
RANK_CANDIDATES = {
    1: (((128,), (128,), 8, 3), ((128,), (64,), 8, 3), ((64,), (64,), 4, 3)),
    2: (((8, 8), (8, 8), 4, 3), ((8, 8), (4, 8), 4, 3), ((8, 16), (8, 8), 8, 3)),
    3: (((2, 8, 8), (1, 8, 8), 8, 3), ((1, 8, 8), (1, 8, 8), 4, 3), ((4, 4, 4), (4, 4, 4), 4, 3),
        ((2, 8, 8), (2, 4, 8), 8, 2)),
}


def rank_candidates(shape: tuple[int, ...], head_dim: int = 128) -> list[KernelConfig]:
    """`RANK_CANDIDATES` for a grid of this shape, clipped to it; above head_dim 128 only those whose
    K/V stages fit in shared memory (key tiles of at most 64 tokens)."""
    out = []
    for q, k, warps, stages in RANK_CANDIDATES.get(len(shape), ()):
        if head_dim > 128 and math.prod(k) > 64:
            continue
        cfg = KernelConfig(clip(q, shape), clip(k, shape), warps, stages)
        try:
            cfg.validate(len(shape))
        except ValueError:
            continue
        out.append(cfg)
    return out
