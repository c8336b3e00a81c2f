"""The one tile factorization (maskdsl.analysis.tiles) and the defaults built on it (codegen.config,
autotune.policy), pinned against values worked out by hand from the rules in their docstrings."""

from __future__ import annotations

import pytest

import maskdsl
from maskdsl.autotune.policy import rank_candidates, ranked_default
from maskdsl.codegen.build import untuned_config
from maskdsl.codegen.config import default_backward_config, default_config, topk_default_config
from maskdsl.simulator.schedule import default_launch
from maskdsl.analysis.tiles import block_tile, clip, forward_launch, split, topk_launch


def _mask(layout: str, text: str):
    return maskdsl.parse(f"layout g = {layout}\nmask m = {text}").masks[0]


@pytest.mark.parametrize("volume, shape, want", [
    # round-robin, last dimension first, each doubling while it stays within its extent
    (128, (16, 44, 80), (4, 4, 8)),  # (2,2,2) -> (4,4,4) -> the last doubles once more
    (64, (16, 44, 80), (4, 4, 4)),
    (128, (32768,), (128,)),
    (128, (4, 4, 4), (4, 4, 8)),  # every extent full at 64 tokens: the rest pads the last dimension
    (64, (8, 2), (8, 8)),  # (2,2) -> (4,2) -> (8,2), then the last takes the remaining 4
    (16, (1, 1, 256), (1, 1, 16)),
])
def test_split(volume, shape, want):
    assert split(volume, shape) == want


def test_block_tile_cuts_outer_dimensions_first():
    assert block_tile((2, 8, 8), 128) == (2, 8, 8)
    assert block_tile((4, 16, 16), 128) == (1, 8, 16)  # 4 -> 2 -> 1, then 16 -> 8 in the middle
    assert block_tile((48,), 128) == (16,)  # the largest power of two dividing 48
    assert block_tile((6,), 128) is None  # 2 tokens: under 16
    assert clip((2, 8, 8), (16, 5, 3)) == (2, 8, 4)  # extents round up to 8 and 4


def test_launch_rules():
    assert forward_launch(128, 128) == (8, 3) and forward_launch(128, 64) == (4, 3)
    assert forward_launch(64, 128) == (4, 3)
    assert default_launch(128, 128) == (8, 3) and default_launch(64, 256) == (4, 3)  # the simulator's is the same rule
    assert topk_launch((2, 8, 8)) == (8, 2) and topk_launch((64,)) == (4, 2)


def test_untuned_forward_and_backward_configs():
    cosmos = _mask("grid(16, 44, 80)", "neighborhood(window=(4, 8, 8))")
    assert default_config(cosmos, 128).key() == "q4x4x8_k4x4x4_w8_s3"
    assert default_config(cosmos, 64).key() == "q4x4x8_k4x4x8_w4_s3"  # 128-token key tiles at head_dim 64
    assert default_backward_config(cosmos, 128).key() == "bwd-q4x4x4_k4x4x4_w4_s2-q4x4x8_k4x4x4_w8_s2"
    assert default_backward_config(cosmos, 64).key() == "bwd-q4x4x4_k4x4x8_w8_s2-q4x4x8_k4x4x4_w8_s2"
    assert untuned_config(_mask("grid(32768)", "sliding_window(4096)"), 128).key() == "q128_k64_w8_s3"


def test_topk_default_is_the_largest_tile_dividing_the_block():
    video = _mask("grid(8, 32, 32)", "topk(4, block=(2, 8, 8))")
    assert topk_default_config(video).key() == "q2x8x8_k2x8x8_w8_s2"
    one_d = _mask("grid(4096)", "topk(2, block=64)")
    assert untuned_config(one_d).key() == "q64_k64_w4_s2"
    assert ranked_default(one_d, 128, on_hopper=True).key() == "q64_k64_w4_s2"  # top-k keeps its own tile


def test_rank_candidates_are_clipped_to_the_grid():
    assert [c.key() for c in rank_candidates((16, 16))] == ["q8x8_k8x8_w4_s3", "q8x8_k4x8_w4_s3", "q8x16_k8x8_w8_s3"]
    assert [c.key() for c in rank_candidates((2, 64, 64))][0] == "q2x8x8_k1x8x8_w8_s3"
    assert [c.key() for c in rank_candidates((1, 4, 8))][0] == "q1x4x8_k1x4x8_w8_s3"  # 32 tokens each
    assert [c.key() for c in rank_candidates((32768,), 256)] == ["q128_k64_w8_s3", "q64_k64_w4_s3"]


def test_on_hopper_the_default_is_a_gluon_pair_where_one_is_predicted_fastest():
    mask = _mask("grid(4, 16, 16)", "block((2, 16, 16))")
    cfg = ranked_default(mask, 128, on_hopper=True)
    assert cfg.block_m == 128 and cfg.block_n == 128 and (cfg.num_warps, cfg.num_stages) == (8, 3)
    assert ranked_default(mask, 96, on_hopper=True).block_n == 64  # head_dim 96: no Gluon forward, template tiles
