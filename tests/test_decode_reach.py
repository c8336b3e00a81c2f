"""The keys a decode step reads (maskdsl.analysis.decode_reach) and the simulator's bytes and time
(simulator.decode), against the oracle's mask and numbers worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import maskdsl
from maskdsl.analysis.decode_reach import reach_table, reached_keys, step_ranges
from maskdsl.harness.semantics import static_mask
from maskdsl.simulator.cost import CostModel
from maskdsl.simulator.decode import DecodeStep, predict_decode, step_bytes
from test_decode import SPECS, random_lens, spec_of


@pytest.mark.parametrize("name", [n for n in SPECS])
def test_step_ranges_cover_every_attended_key_once(name, gen):
    spec, _ = spec_of(name)
    mask = spec.mask("m")
    shape, tokens = mask.layout.shape, mask.layout.tokens
    table = reach_table(mask)
    q_len = {"image_rows": 8, "video_frames": 16}.get(name, 3)
    lens = random_lens(gen, 6, q_len, tokens, name)
    ranges = step_ranges(table, lens, q_len)
    for b, n in enumerate(lens):
        rows = torch.arange(n - q_len, n)
        seen = static_mask(mask.expr, shape, rows).any(0).nonzero().flatten().tolist()
        read = np.zeros(tokens, int)
        for lo, hi in ranges[b]:
            if lo <= hi:
                read[lo:hi + 1] += 1
        assert read.max(initial=0) <= 1  # no key twice: the kernel would count it twice in the softmax
        assert read[n:].sum() == 0  # nothing past the cache
        assert all(read[j] for j in seen), (b, n)
        if name in ("window_sinks", "causal", "strided", "empty_rows"):  # 1-D, undilated: exactly what is seen
            assert read.sum() == len(seen)


def test_a_window_with_sinks_at_128k_reads_the_window_and_the_sinks():
    spec = maskdsl.parse("layout s = grid(131072)\nmask m = (sliding_window(4096, causal=true) | sink(4)) & causal\n")
    table = reach_table(spec.mask("m"))
    assert reached_keys(table, [131072, 4096, 4100, 3], 1).tolist() == [4100, 4096, 4100, 3]
    assert reached_keys(table, [131072], 8).tolist() == [4096 + 7 + 4]


def test_the_simulator_costs_bytes_over_bandwidth_plus_a_floor_per_launch():
    spec = maskdsl.parse("layout s = grid(131072)\nmask m = (sliding_window(4096, causal=true) | sink(4)) & causal\n")
    table = reach_table(spec.mask("m"))
    step = DecodeStep((131072,) * 2, heads=64, kv_heads=8, q_len=1, head_dim=128, splits=4)
    kv, total = step_bytes(table, step)
    assert kv == 2 * 4100 * 8 * 2 * 128 * 2  # sequences x keys x kv heads x (K, V) x head_dim x bf16
    rows = 2 * 64 * 1
    assert total == kv + rows * 128 * 2 * 2 + rows * 4 + rows * 4 * 129 * 4 * 2
    model = CostModel.for_gpu("H100")
    got = predict_decode(table, step, model, efficiency=0.5, floor_us=3.0)
    assert got.launches == 2
    assert got.time_us == pytest.approx(2 * 3.0 + total / (model.hbm_gbps * 1e9 * 0.5) * 1e6)
    assert predict_decode(table, DecodeStep((131072,), 64, 8, 1, 128), model).launches == 1


def test_a_top_k_step_adds_its_picked_blocks_and_the_selection_read():
    spec = maskdsl.parse("layout s = grid(32768)\nmask m = (sliding_window(512, causal=true) | sink(4)) & causal\n")
    table = reach_table(spec.mask("m"))
    base = DecodeStep((32768,), heads=64, kv_heads=8, q_len=1, head_dim=128)
    step = DecodeStep((32768,), heads=64, kv_heads=8, q_len=1, head_dim=128, picked_keys=8 * 16 * 128,
                      selection_keys=8 * 32768)
    (kv0, total0), (kv, total) = step_bytes(table, base), step_bytes(table, step)
    assert kv - kv0 == 8 * 16 * 128 * 2 * 256  # the picked blocks' K and V rows (bf16, head_dim 128)
    assert total - total0 == (kv - kv0) + 8 * 32768 * 256 + 64 * 256  # + every cached K row, the queries again
    model = CostModel.for_gpu("H100")
    from maskdsl.simulator.decode import SELECTION_LAUNCHES

    assert predict_decode(table, step, model).launches == 1 + SELECTION_LAUNCHES


@pytest.mark.parametrize("name, exact", [("window_sinks", True), ("causal", True), ("strided", True),
                                         ("dilated", False), ("image_rows", False)])
def test_a_table_says_whether_its_intervals_are_exactly_the_keys(name, exact):
    """Exact tables (1-D, undilated) hold each row's keys and nothing else: checked against the oracle."""
    spec, _ = spec_of(name)
    mask = spec.mask("m")
    table = reach_table(mask)
    assert table.exact == exact
    rows = torch.arange(mask.layout.tokens)
    seen = static_mask(mask.expr, mask.layout.shape, rows)
    covered = torch.zeros_like(seen)
    for p in range(mask.layout.tokens):
        for lo, hi in table.intervals[p].reshape(-1, 2):
            if lo <= hi:
                covered[p, lo:hi + 1] = True
    assert not (seen & ~covered).any()  # every key is inside the intervals
    assert torch.equal(seen, covered) == exact
