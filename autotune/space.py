"""The search space of a mask: tile shapes the simulator ranks well, times warps and pipeline depth.

Tile shapes come from the simulator (maskdsl's closed-form analysis): for every pair of tile
volumes (BLOCK_M, BLOCK_N) the best few multi-D factorizations by upper-bound and predicted
speedup. An explicit list keeps the space small enough to sweep exhaustively for checking.
"""

from __future__ import annotations

from maskdsl.codegen.config import KernelConfig
from maskdsl.spec import ir

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
    from maskdsl.analysis.tiles import block_tile
    from maskdsl.harness.topk import normal_form

    block = normal_form(mdef.expr).topk.block
    tiles = [t for v in (128, 64) if (t := block_tile(block, v)) is not None]
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
    walks it, which is why autotune.policy.ranked_backward_default takes the same tiles.
    """
    return {name: tile_pairs(spec, mask, per_volume, BWD_BLOCKS[name]) for name in KERNELS}


def _kernel_configs(pairs) -> list[KernelConfig]:
    return [KernelConfig(q, k, w, s) for q, k in pairs for w in BWD_WARPS for s in BWD_STAGES]


def encode_backward(config) -> dict:
    """A BackwardConfig as the parameters a trial stores: each kernel's tiles, warps and stages, and
    `atomic` for the atomic-dQ backward (absent for the split one, as in studies stored before it)."""
    out = {}
    for name, cfg in (("dkdv", config.dkdv), ("dq", config.dq)):
        for key, value in encode(cfg).items():
            out[f"{name}_{key}"] = value
    if config.atomic:
        out["atomic"] = True
    return out


def decode_backward(params: dict):
    """A backward trial's parameters back to a BackwardConfig, through the one key parser."""
    from maskdsl.codegen.config import BackwardConfig

    keys = [decode({k: params[f"{name}_{k}"] for k in ("tiles", "num_warps", "num_stages")}).key()
            for name in KERNELS]
    return BackwardConfig.from_key("bwd-" + "-".join(keys) + ("-atomic" if params.get("atomic") else ""))


def decode_any(params: dict):
    """A stored trial's parameters -> its KernelConfig (forward) or BackwardConfig (backward)."""
    return decode_backward(params) if "dkdv_tiles" in params else decode(params)


def backward_seeds(spec: ir.Spec, mask: str, head_dim: int = 128, count: int = 4, per_volume: int = 1,
                   gpu: str | None = None, atomic: bool = False) -> list:
    """What a fresh backward study tries first: the untuned default (the yardstick), then the
    simulator's best predicted backward configs where `gpu`'s backward constants are fitted (each
    kernel ranked on its own: the backward's time is the sum of the two), else each kernel's
    best-ranked tile pairs at the default warps and stages.

    `atomic`: the atomic-dQ backward's seeds (its dK/dV kernel ranked by the atomic prediction where
    `bwd_atomic_us` is fitted; the unused dQ config stays the default's)."""
    from dataclasses import replace

    from maskdsl.codegen.config import BackwardConfig

    from maskdsl.autotune.policy import ranked_backward_default

    mdef = spec.mask(mask)
    default = ranked_backward_default(mdef, head_dim)
    out = [default]
    pairs = backward_tile_pairs(spec, mask, per_volume)
    ranked = {name: _rank_kernel(spec, mask, name, _kernel_configs(pairs[name]), gpu, atomic) for name in KERNELS}
    if atomic:
        ranked["dq"] = [default.dq] if ranked["dkdv"] else []
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
    if atomic:
        out = list(dict.fromkeys(replace(cfg, dq=default.dq, atomic=True) for cfg in out))
    return out[:count]


def _rank_kernel(spec: ir.Spec, mask: str, kernel: str, configs: list[KernelConfig],
                 gpu: str | None = None, atomic: bool = False) -> list[KernelConfig]:
    """Configs of one backward kernel, fastest predicted first; [] when `gpu`'s backward is not calibrated
    (with `atomic`: the atomic-dQ backward's dK/dV kernel, [] for its dQ kernel, which does not run)."""
    if atomic and kernel != "dkdv":
        return []
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
                               costs=model, atomic=atomic)
        except ValueError:
            continue
        if t is None:
            return []
        timed.append((t, cfg))
    return [cfg for _, cfg in sorted(timed, key=lambda tc: tc[0])]
