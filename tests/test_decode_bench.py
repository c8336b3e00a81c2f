"""The CPU-testable parts of `maskdsl bench --decode` (bench/decode.py): the cases, the paged copy of a
cache, and one whole case's record through Triton's interpreter with a stand-in timer."""

from __future__ import annotations

import pytest
import torch

from maskdsl.bench import decode as bench


def test_the_cases_cover_the_issue_targets_within_the_memory_bound():
    cases = bench.default_cases()
    names = {c.name for c in cases}
    assert all(c.context * c.batch <= bench.MAX_CACHED_TOKENS for c in cases)
    assert {c.context for c in cases if c.mask == "causal"} == {8192, 32768, 131072}
    assert {c.mask for c in cases} == set(bench.MASKS)
    assert {c.batch for c in cases} >= {1, 8, 64} and {c.q_len for c in cases} == {1, 8}
    assert "window_sinks_ctx131072_b1_q1" in names and "nsa_ctx32768_b8_q8" in names
    assert all((c.heads, c.kv_heads, c.head_dim, c.dtype) == (64, 8, 128, "bf16") for c in cases)
    assert [c.name for c in bench.select(cases, "window_sinks_ctx131072_b8,causal_ctx8192_b1_q1")] == [
        "causal_ctx8192_b1_q1", "window_sinks_ctx131072_b8_q1", "window_sinks_ctx131072_b8_q8"]


def test_the_paged_copy_holds_each_sequence_in_its_table_order(monkeypatch):
    monkeypatch.setattr(bench, "PAGE_SIZE", 4)
    case = bench.DecodeCase("causal", 10, 2, 1, heads=2, kv_heads=1, head_dim=16, dtype="fp32")
    q, kc, vc, lens, pool_k, pool_v, table = bench.make_inputs(case, "cpu")
    assert table.shape == (2, 3) and sorted(table.flatten().tolist()) == list(range(6))
    for b in range(2):
        for j in range(10):
            page, slot = table[b, j // 4], j % 4
            assert torch.equal(pool_k[page, :, slot], kc[b, :, j]) and torch.equal(pool_v[page, :, slot], vc[b, :, j])


@pytest.mark.parametrize("mask", ["causal", "window_sinks", "nsa"])
def test_a_case_checks_then_times_each_config_and_reports_bytes_per_second(mask, monkeypatch):
    monkeypatch.setattr(bench, "PAGE_SIZE", 16)
    monkeypatch.setitem(bench.MASKS, "window_sinks", "(sliding_window(20, causal=true) | sink(4)) & causal")
    monkeypatch.setitem(bench.MASKS, "nsa", "(topk(k=2, block=16) | sliding_window(8, causal=true) | sink(2)) & causal")
    case = bench.DecodeCase(mask, 96, 2, 2, heads=4, kv_heads=2, head_dim=16, dtype="fp32")
    times = iter([0.5, 0.6, 0.25, 0.7] if mask != "nsa" else [0.5, 0.6, 0.4, 0.25, 0.7, 0.3])  # ms per timed call:
    # the second config is the faster on the contiguous cache, the first on the paged one

    def timer(fn):  # ours first (config by config, each cache layout in turn), then SDPA's backends
        fn()
        return next(times, 1.0)

    r = bench.run_case(case, "cpu", timer=timer, graph_timer=None, with_flex=False,
                       configs=bench.parse_configs("32x4x2,16x2x1"))
    assert [c["config"] for c in r["configs"]] == [[32, 4, 2], [16, 2, 1]]
    assert all(c["ours_error"] < 1e-5 and c["ours_paged_error"] < 1e-5 for c in r["configs"])
    if mask == "nsa":  # top-k also runs with the block means kept beside the cache
        assert all(c["ours_means_error"] < 1e-5 for c in r["configs"]) and r["ours_means_ms"] == 0.3
    else:
        assert not any("ours_means_ms" in c for c in r["configs"])
    assert (r["ours_config"], r["ours_ms"], r["ours_paged_config"], r["ours_paged_ms"]) == ([16, 2, 1], 0.25,
                                                                                          [32, 4, 2], 0.6)
    row = 2 * 2 * 16 * 4  # kv heads x (K, V) x head_dim x fp32
    if mask == "causal":
        assert r["kv_bytes"] == 2 * 96 * row  # every cached key of both sequences
    elif mask == "window_sinks":
        assert r["kv_bytes"] == 2 * (20 + 1 + 4) * row  # the window of both new rows and the sinks
    else:  # the window and sinks, plus the blocks a head of the group picked (the decode reference's picks)
        from maskdsl.harness.decode import decode_picks

        q, k, *_ = bench.make_inputs(case, "cpu")  # the case's inputs: the same seed
        keys = 0
        for b in range(2):
            picks = decode_picks(q[b], k[b], case.spec(), "m", 96)  # [heads, 6 blocks of 16]
            for kv_head in range(2):
                seen = set(range(87, 96)) | {0, 1}  # the window of rows 94 and 95, the sinks
                for block in picks[2 * kv_head:2 * kv_head + 2].any(0).nonzero().flatten().tolist():
                    seen |= set(range(16 * block, 16 * block + 16))
                keys += len(seen)
        assert r["kv_bytes"] == keys * 2 * 16 * 4
        assert r["selection_bytes"] == 2 * 2 * 96 * 16 * 4  # every cached key once, for the block means
    assert r["ours_tbps"] == pytest.approx(r["kv_bytes"] / 0.25e-3 / 1e12)
    assert "flex_ms" not in r and bench.summary(r).startswith(case.name)


def test_configs_parse_and_refuse():
    assert bench.parse_configs(None) == bench.DEFAULT_CONFIGS
    assert bench.parse_configs("64x4x2,128x8x3") == ((64, 4, 2), (128, 8, 3))
    with pytest.raises(ValueError, match="BLOCK_NxWARPSxSTAGES"):
        bench.parse_configs("64-4-2")
