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
    assert {c.batch for c in cases} >= {1, 8, 64} and {c.q_len for c in cases} == {1, 8}
    assert "window_sinks_ctx131072_b1_q1" in names
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


@pytest.mark.parametrize("mask", ["causal", "window_sinks"])
def test_a_case_checks_then_times_and_reports_bytes_per_second(mask, monkeypatch):
    monkeypatch.setattr(bench, "PAGE_SIZE", 16)
    monkeypatch.setitem(bench.MASKS, "window_sinks", "(sliding_window(20, causal=true) | sink(4)) & causal")
    case = bench.DecodeCase(mask, 96, 2, 2, heads=4, kv_heads=2, head_dim=16, dtype="fp32")
    calls = []

    def timer(fn):
        fn()
        calls.append(fn)
        return 0.5  # ms

    r = bench.run_case(case, "cpu", timer=timer, graph_timer=None, with_flex=False)
    assert r["ours_error"] < 1e-5 and r["ours_paged_error"] < 1e-5
    keys = {"causal": 96, "window_sinks": 20 + 1 + 4}[mask]  # the whole cache; the window of both rows and the sinks
    assert r["kv_bytes"] == 2 * keys * 2 * 2 * 16 * 4  # sequences x keys x kv heads x (K, V) x head_dim x fp32
    assert r["ours_tbps"] == pytest.approx(r["kv_bytes"] / 0.5e-3 / 1e12)
    assert r["ours_ms"] == r["ours_paged_ms"] == 0.5 and len(calls) >= 2
    assert "flex_ms" not in r and bench.summary(r).startswith(case.name)
