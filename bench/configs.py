"""Which configs a benchmark times: the candidates per mask, and the fixed lists of the TMA comparison."""

from __future__ import annotations

import math

# configs of the TMA / pointer-load comparison (`maskdsl bench --suite --paths`, docs/BENCHMARKS.md)
PATH_CONFIGS = {
    "dense_32k": ["q128_k128_w8_s2", "q128_k64_w8_s3", "q128_k64_w8_s4", "q64_k64_w4_s3", "q64_k64_w4_s4",
                  "q64_k128_w4_s2", "q256_k64_w16_s2", "q128_k128_w8_s3"],
    "window_1d_32k": ["q128_k128_w8_s2", "q128_k64_w8_s3", "q64_k64_w4_s3", "q128_k128_w8_s3", "q64_k128_w4_s2"],
    "blocked_3d": ["q2x8x8_k2x8x8_w8_s2", "q2x8x8_k1x8x8_w8_s3", "q1x8x8_k1x8x8_w4_s3", "q1x8x8_k2x8x8_w4_s2",
                   "q2x8x8_k2x8x8_w8_s3", "q2x8x16_k2x8x8_w16_s2", "q1x8x8_k1x8x8_w4_s4"],
    "gna_3d": ["q2x8x8_k1x8x8_w8_s3", "q2x8x8_k1x8x8_w4_s3", "q1x8x8_k1x8x8_w4_s3", "q2x8x8_k1x8x8_w8_s4",
               "q2x8x8_k2x8x8_w8_s2"],
    "neighborhood_3d": ["q4x4x4_k4x4x4_w4_s3", "q4x4x8_k4x4x4_w8_s3", "q2x8x8_k2x4x8_w8_s2", "q2x8x8_k2x8x8_w8_s2"],
    "neighborhood_2d": ["q8x8_k4x8_w4_s3", "q8x16_k8x8_w8_s2", "q8x8_k8x8_w4_s3", "q8x16_k8x8_w8_s3"],
}


def candidate_configs(mask, head_dim: int, limit: int = 6, attention=None):
    """The tuned config (tuning database) if any, the default, and the configs that measured best on an
    H200 for each rank (docs/BENCHMARKS.md), clipped to the grid."""
    from maskdsl.api import lookup_config
    from maskdsl.codegen.config import KernelConfig, default_config

    shape = mask.layout.shape
    from maskdsl.autotune.space import gluon_pair

    out = [lookup_config(mask, attention)]
    gluon = gluon_pair(mask, head_dim, attention)  # the Gluon forward's best pair, timed even where a template pair is predicted faster
    for cfg in (default_config(mask, head_dim), gluon and gluon[0]):  # None where the kernel cannot run it
        if cfg is not None and cfg not in out:
            out.append(cfg)
    by_rank = {
        1: [((128,), (128,), 8, 3), ((128,), (64,), 8, 3), ((64,), (64,), 4, 3)],
        2: [((8, 8), (8, 8), 4, 3), ((8, 8), (4, 8), 4, 3), ((8, 16), (8, 8), 8, 3)],
        3: [((2, 8, 8), (1, 8, 8), 8, 3), ((1, 8, 8), (1, 8, 8), 4, 3), ((4, 4, 4), (4, 4, 4), 4, 3),
            ((2, 8, 8), (2, 4, 8), 8, 2)],
    }
    for q, k, warps, stages in by_rank.get(len(shape), []):
        if head_dim > 128 and math.prod(k) > 64:
            continue  # the K/V stages would not fit in shared memory
        try:
            cfg = KernelConfig(_clip(q, shape), _clip(k, shape), warps, stages)
            cfg.validate(len(shape))
        except ValueError:
            continue
        if cfg not in out:
            out.append(cfg)
    return out[:limit]


def _clip(tile, shape):
    """A tile no longer than the grid in any dimension (rounded up to a power of two)."""
    return tuple(min(t, 1 << max(0, (n - 1).bit_length())) for t, n in zip(tile, shape))
