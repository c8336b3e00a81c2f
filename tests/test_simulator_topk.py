"""The simulator on top-k masks: expectations, bracketed by the exact static part and the envelope."""

import math

import numpy as np

import maskdsl
from maskdsl.spec import ir
from maskdsl.simulator import simulate

from sim_brute import check_against_brute, make_spec


def test_topk_reports_expectations():
    spec = maskdsl.parse("layout s = grid(128)\nmask m = topk(k=2, block=16)")
    r = simulate(spec, "m", (16,), (16,))
    assert r.expected and any("EXPECTATION" in n for n in r.notes)
    key_blocks = 128 // 16
    assert r.visited_tiles == r.q_tiles * 2  # each query tile keeps k tiles
    assert math.isclose(r.density, 2 / key_blocks)


def test_topk_with_static_part_sits_between_static_and_envelope():
    text = "layout s = grid(256)\nmask m = (topk(k=3, block=32) | sliding_window(20, causal=true) | sink(4)) & causal"
    spec = maskdsl.parse(text)
    r = simulate(spec, "m", (32,), (32,))
    static = make_spec((256,), ir.intersection(ir.union(ir.Neighborhood((20,), (1,), (1,), (True,)), ir.Sink(4)),
                                                ir.Causal()))
    envelope = make_spec((256,), ir.Causal())
    low, _ = check_against_brute(static, (32,), (32,), True)
    high, _ = check_against_brute(envelope, (32,), (32,), True)
    assert r.expected
    assert low.visited_tiles < r.visited_tiles <= high.visited_tiles
    assert low.density < r.density <= high.density
    assert np.all(r.visits_per_query_tile >= low.visits_per_query_tile - 1e-9)
    assert np.all(r.visits_per_query_tile <= np.minimum(high.visits_per_query_tile,
                                                        low.visits_per_query_tile + 3) + 1e-9)
