"""The search space of a mask: tile shapes the simulator ranks well, times warps and pipeline depth.

Tile shapes come from the simulator (maskdsl's closed-form analysis): for every pair of tile
volumes (BLOCK_M, BLOCK_N) the best few multi-D factorizations by upper-bound and predicted
speedup. An explicit list keeps the space small enough to sweep exhaustively for checking.
"""

from __future__ import annotations

from functools import lru_cache

from maskdsl.codegen.config import KernelConfig
from maskdsl import ir

Q_TOKENS = (64, 128)
KV_TOKENS = (32, 64, 128)
WARPS = (4, 8)
STAGES = (2, 3, 4)


def tile_pairs(spec: ir.Spec, mask: str, per_volume: int = 3,
               blocks=None) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Tile pairs of the space, best predicted first (the simulator's upper bound, then its prediction).

    `blocks`: the (BLOCK_M, BLOCK_N) token counts to factorize (default: Q_TOKENS x KV_TOKENS).
    """
    from maskdsl.simulator import sweep

    mdef = spec.mask(mask)
    if mdef.dynamic:
        return _topk_tiles(mdef)
    ranked = []
    for qv, kv in blocks or [(q, k) for q in Q_TOKENS for k in KV_TOKENS]:
        try:
            ranked += sweep(spec, mask, q_tokens=qv, kv_tokens=kv, limit=per_volume)
        except ValueError:
            continue
    ranked.sort(key=lambda cr: (-cr[1].predicted_speedup, -cr[1].upper_bound_speedup))
    pairs = []
    for c, _ in ranked:
        if (c.q_tile, c.kv_tile) not in pairs:
            pairs.append((c.q_tile, c.kv_tile))
    return pairs


def _topk_tiles(mdef) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Top-k kernels take equal query and key tiles dividing the block: its largest of 128 and of 64 tokens."""
    from maskdsl.codegen.topk_grid import choose_tile
    from maskdsl.topk import normal_form

    block = normal_form(mdef.expr).topk.block
    tiles = [t for v in (128, 64) if (t := choose_tile(mdef.layout.shape, block, v)) is not None]
    return [(t, t) for t in dict.fromkeys(tiles)]


def configs(spec: ir.Spec, mask: str, per_volume: int = 3) -> list[KernelConfig]:
    return [KernelConfig(q, k, w, s) for q, k in tile_pairs(spec, mask, per_volume) for w in WARPS for s in STAGES]


def seeds(spec: ir.Spec, mask: str, count: int = 4, per_volume: int = 3) -> list[KernelConfig]:
    """The simulator's top predictions within the space, to enqueue before sampling."""
    warps = 8 if 8 in WARPS else WARPS[-1]
    stages = 2 if 2 in STAGES else STAGES[0]
    return [KernelConfig(q, k, warps, stages) for q, k in tile_pairs(spec, mask, per_volume)[:count]]


def tiles_label(q_tile, kv_tile) -> str:
    """The categorical value Optuna samples for a tile pair: '2x8x8/1x8x8'."""
    return "x".join(map(str, q_tile)) + "/" + "x".join(map(str, kv_tile))


def encode(config: KernelConfig) -> dict:
    """A config as the parameters a trial stores."""
    return {"tiles": tiles_label(config.q_tile, config.kv_tile), "num_warps": config.num_warps,
            "num_stages": config.num_stages}


def decode(params: dict) -> KernelConfig:
    """A trial's parameters back to a config, through the one key parser."""
    q, k = params["tiles"].split("/")
    return KernelConfig.from_key(f"q{q}_k{k}_w{params['num_warps']}_s{params['num_stages']}")


@lru_cache(maxsize=256)
def ranked_tiles(mask: ir.MaskDef, q_tokens: int, kv_tokens: int):
    """The simulator's best (q_tile, kv_tile) at these block sizes, or None when it cannot rank them."""
    from maskdsl.analysis import NotAnalyzable
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
    from maskdsl.analysis import NotAnalyzable
    from maskdsl.gluon_rule import GLUON_HEAD_DIMS
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
        if res.gluon:  # the simulator costs maskdsl.gluon_rule's verdict, the one codegen builds tables from
            return KernelConfig(tiles.q_tile, tiles.kv_tile, 8, 3), res.predicted_speedup >= best
    return None


def gluon_config(mask: ir.MaskDef, head_dim: int = 128, attention: ir.Attention | None = None) -> KernelConfig | None:
    """`gluon_pair`'s config when it is predicted faster than every template pair, else None: the
    untuned default on Hopper."""
    pair = gluon_pair(mask, head_dim, attention)
    return pair[0] if pair is not None and pair[1] else None


def _hopper() -> bool:
    """Whether kernels compiled here will run the Gluon forward (a Hopper GPU, not the interpreter)."""
    import torch

    from maskdsl.codegen.dispatch import device_blocker

    return torch.cuda.is_available() and device_blocker(torch.device("cuda", torch.cuda.current_device())) is None


def ranked_default(mask: ir.MaskDef, head_dim: int = 128, attention: ir.Attention | None = None) -> KernelConfig:
    """The config `compile` uses when nothing is tuned: the simulator's best tile pair at the default
    block sizes, with the default warps and stages.

    The fixed default tile (a near-cube) is far from the best on masks with a preferred tile shape:
    on the 3-D GNA example it measured 5.2x where the simulator's first choice, which is perfectly
    block-sparse, measured 7.2x. Ranking is analytical (well under a second), so a user who never
    tunes still gets the tile pair the simulator would seed a study with.
    """
    from maskdsl.codegen.compiled import untuned_config

    base = untuned_config(mask, head_dim)
    if _hopper():  # the warp-specialized forward beats the template's best tiles wherever it applies
        gluon = gluon_config(mask, head_dim, attention)  # (H100: hunyuan GNA 24.6 ms against 29.5 ms)
        if gluon is not None:
            return gluon
    tiles = None if mask.dynamic else ranked_tiles(mask, base.block_m, base.block_n)
    return base if tiles is None else KernelConfig(*tiles, base.num_warps, base.num_stages)


def ranked_backward_default(mask: ir.MaskDef, head_dim: int = 128):
    """The backward's untuned config: codegen's block sizes, warps and stages with the simulator's best
    tiles for each kernel. A (query tile, key tile) pair is full or partial whichever kernel walks it,
    so the forward's ranking serves the transposed walk too.

    Measured on an H100 (3-D GNA, stride (2,8,8)): near-cubic backward tiles ran the backward at 5.6x
    the forward's time, because those tiles cut the stride groups and most pairs became partial.
    """
    from maskdsl.codegen.config import BackwardConfig, default_backward_config

    base = default_backward_config(mask, head_dim)
    kernels = []
    for cfg in (base.dkdv, base.dq):
        tiles = ranked_tiles(mask, cfg.block_m, cfg.block_n)
        kernels.append(cfg if tiles is None else KernelConfig(*tiles, cfg.num_warps, cfg.num_stages))
    return BackwardConfig(*kernels)


# --- the backward: two kernels, each with its own tiles, warps and stages ---------------------------

# (queries walked, keys owned) of the dK/dV kernel and (queries owned, keys walked) of the dQ kernel:
# KernelConfig's (BLOCK_M, BLOCK_N) of each (codegen.config.BackwardConfig reads dkdv the forward's way round)
BWD_BLOCKS = {"dkdv": tuple((q, k) for k in (64, 128) for q in (32, 64, 128)),
              "dq": tuple((q, k) for q in (64, 128) for k in (32, 64))}
BWD_WARPS = (4, 8)
BWD_STAGES = (2, 3)
KERNELS = ("dkdv", "dq")


def backward_tile_pairs(spec: ir.Spec, mask: str, per_volume: int = 1) -> dict[str, list]:
    """Per backward kernel, its tile pairs: the simulator's best `per_volume` at each of its block sizes.

    The ranking is the forward's: a (query tile, key tile) pair is full or partial whichever kernel
    walks it, which is why ranked_backward_default takes the same tiles.
    """
    return {name: tile_pairs(spec, mask, per_volume, BWD_BLOCKS[name]) for name in KERNELS}


def backward_configs(spec: ir.Spec, mask: str, per_volume: int = 1) -> list:
    """Every BackwardConfig of the space (the product of the two kernels' configs)."""
    from maskdsl.codegen.config import BackwardConfig

    per_kernel = [_kernel_configs(pairs) for pairs in backward_tile_pairs(spec, mask, per_volume).values()]
    return [BackwardConfig(a, b) for a in per_kernel[0] for b in per_kernel[1]]


def _kernel_configs(pairs) -> list[KernelConfig]:
    return [KernelConfig(q, k, w, s) for q, k in pairs for w in BWD_WARPS for s in BWD_STAGES]


def encode_backward(config) -> dict:
    """A BackwardConfig as the parameters a trial stores: each kernel's tiles, warps and stages."""
    out = {}
    for name, cfg in (("dkdv", config.dkdv), ("dq", config.dq)):
        for key, value in encode(cfg).items():
            out[f"{name}_{key}"] = value
    return out


def decode_backward(params: dict):
    """A backward trial's parameters back to a BackwardConfig, through the one key parser."""
    from maskdsl.codegen.config import BackwardConfig

    keys = [decode({k: params[f"{name}_{k}"] for k in ("tiles", "num_warps", "num_stages")}).key()
            for name in KERNELS]
    return BackwardConfig.from_key("bwd-" + "-".join(keys))


def decode_any(params: dict):
    """A stored trial's parameters -> its KernelConfig (forward) or BackwardConfig (backward)."""
    return decode_backward(params) if "dkdv_tiles" in params else decode(params)


def backward_seeds(spec: ir.Spec, mask: str, head_dim: int = 128, count: int = 4, per_volume: int = 1,
                   gpu: str | None = None) -> list:
    """What a fresh backward study tries first: the untuned default (the yardstick), then the
    simulator's best predicted backward configs where `gpu`'s backward constants are fitted (each
    kernel ranked on its own: the backward's time is the sum of the two), else each kernel's
    best-ranked tile pairs at the default warps and stages."""
    from maskdsl.codegen.config import BackwardConfig

    mdef = spec.mask(mask)
    default = ranked_backward_default(mdef, head_dim)
    out = [default]
    pairs = backward_tile_pairs(spec, mask, per_volume)
    ranked = {name: _rank_kernel(spec, mask, name, _kernel_configs(pairs[name]), gpu) for name in KERNELS}
    if ranked["dkdv"] and ranked["dq"]:
        for i in range(count):
            cfg = BackwardConfig(ranked["dkdv"][min(i, len(ranked["dkdv"]) - 1)],
                                 ranked["dq"][min(i, len(ranked["dq"]) - 1)])
            if cfg not in out:
                out.append(cfg)
    else:
        for dkdv_pair, dq_pair in zip(pairs["dkdv"], pairs["dq"]):
            cfg = BackwardConfig(KernelConfig(*dkdv_pair, default.dkdv.num_warps, default.dkdv.num_stages),
                                 KernelConfig(*dq_pair, default.dq.num_warps, default.dq.num_stages))
            if cfg not in out:
                out.append(cfg)
    return out[:count]


def _rank_kernel(spec: ir.Spec, mask: str, kernel: str, configs: list[KernelConfig],
                 gpu: str | None = None) -> list[KernelConfig]:
    """Configs of one backward kernel, fastest predicted first; [] when `gpu`'s backward is not calibrated."""
    from maskdsl.simulator.backward import predict_kernel
    from maskdsl.simulator.cost import CostModel

    try:
        model = CostModel.for_gpu(gpu)
    except (KeyError, ValueError):  # a GPU without cost constants: no ranking, not an error
        return []
    timed = []
    for cfg in configs:
        try:
            t = predict_kernel(spec, mask, kernel, cfg.q_tile, cfg.kv_tile, cfg.num_warps, cfg.num_stages,
                               costs=model)
        except ValueError:
            continue
        if t is None:
            return []
        timed.append((t, cfg))
    return [cfg for _, cfg in sorted(timed, key=lambda tc: tc[0])]
