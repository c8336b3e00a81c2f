"""Which configs a benchmark times: the candidates per mask, and the fixed lists of the TMA comparison."""

from __future__ import annotations

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
    """The tuned config (tuning database) if any, codegen's untuned config, the Gluon forward's best pair
    (timed even where a template pair is predicted faster) and the configs that measured best for the
    grid's rank (autotune.policy.rank_candidates)."""
    from maskdsl.api import lookup_config
    from maskdsl.autotune.policy import gluon_pair, rank_candidates
    from maskdsl.codegen.config import default_config

    out = [lookup_config(mask, attention)]
    gluon = gluon_pair(mask, head_dim, attention)
    for cfg in (default_config(mask, head_dim), gluon and gluon[0], *rank_candidates(mask.layout.shape, head_dim)):
        if cfg is not None and cfg not in out:  # None where the Gluon forward takes no pair
            out.append(cfg)
    return out[:limit]
