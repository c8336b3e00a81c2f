"""How a tile pair's time grows with head_dim (simulator.headdim): products scale with it, the softmax's
exponentials do not. Expected values are hand arithmetic from the spec rates."""

import pytest

from maskdsl.lang.parser import parse
from maskdsl.simulator.cost import CostModel
from maskdsl.simulator.headdim import head_dim_scale, product_share
from maskdsl.simulator.simulation import simulate

# H100 SXM: 989 dense bf16 TFLOPS, 3.9e12 exponentials a second. Per pair at head_dim 128:
# 4 * 128 / 989e12 s = 0.5177 ps of products, 1 / 3.9e12 s = 0.2564 ps of exponentials
SHARE = 0.5177 / (0.5177 + 0.2564)


def test_share_from_the_spec_rates():
    assert product_share(989.0, 3.9) == pytest.approx(SHARE, abs=1e-3)
    assert product_share(None, 3.9) == 1.0 and product_share(989.0, None) == 1.0


def test_scale_sums_products_and_exponentials_in_the_template():
    assert head_dim_scale(128, SHARE) == pytest.approx(1.0)
    assert head_dim_scale(64, SHARE) == pytest.approx(0.5 * SHARE + (1 - SHARE))  # 0.666, not 0.5
    assert head_dim_scale(96, SHARE) == pytest.approx(1.0)  # runs 128 columns
    assert head_dim_scale(64) == pytest.approx(0.5)  # no rates: proportional, the model before the term


def test_gluon_overlaps_them():
    """Ping-pong: a pair costs the larger of products and exponentials; at 64 they are about equal."""
    assert head_dim_scale(64, SHARE, overlapped=True) == pytest.approx(max(0.5 * SHARE, 1 - SHARE) / SHARE)
    assert head_dim_scale(32, SHARE, overlapped=True) == pytest.approx((1 - SHARE) / SHARE)


def _spec(head_dim):
    return parse(f"layout g = grid(16384)\nmask m = dilated(window=1024, dilation=2)\n"
                 f"attention a(mask=m, heads=8, head_dim={head_dim})\n")


def test_a_head_dim_64_prediction_uses_the_scale():
    """Template tiles only (no per-CTA cost, launch or loads): the 64-wide kernel takes the scale's
    share of the 128-wide one's time; with no rates in the entry, half."""
    entry = {"c_full": 1.0, "c_partial": 1.3, "c_tile": 0.0, "sms": 132, "tile_us": 2.0}
    rated = CostModel.from_entry("H", {**entry, "tensor_tflops": 989.0, "sfu_tflops": 3.9})
    plain = CostModel.from_entry("H", entry)
    for model, want in ((rated, 0.5 * SHARE + 1 - SHARE), (plain, 0.5)):
        a, b = (simulate(_spec(d), "m", (128,), (64,), costs=model, num_warps=8) for d in (64, 128))
        assert a.predicted_ms / b.predicted_ms == pytest.approx(want, rel=2e-3)
