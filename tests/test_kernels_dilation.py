"""Unions whose terms differ in dilation along a dimension: they compile, and match the reference.

The layout leaves such a dimension undilated (`analysis.layout_dilation`, the simulator's rule too):
a dilated term's keys are then a strided set inside a key range, which the kernel's tile loops
bound and its predicate makes exact. Outputs start NaN-poisoned (run_case); sizes are odd.
"""

import pytest
import torch

import maskdsl
from maskdsl.analysis.counts import layout_dilation, products
from maskdsl.codegen.config import KernelConfig
from maskdsl.codegen.plan import build_plan

from test_kernels import rel_err, run_case

CASES = [
    # (id, spec, q_tile, kv_tile, layout dilation the plan must use)
    ("2d-dilated-or-wide", ("layout g = grid(12, 10)\nmask m = neighborhood(window=(3, 5), dilation=(2, 1)) "
                            "| neighborhood(window=(12, 3))"), (4, 4), (2, 8), (1, 1)),
    ("1d-near-or-dilated", "layout s = grid(45)\nmask m = sliding_window(3) | dilated(3, 4)", (16,), (16,), (1,)),
    ("2d-dilated-or-sink", "layout g = grid(11, 9)\nmask m = neighborhood(window=(3, 3), dilation=(2, 3)) | sink(5)",
     (4, 4), (4, 4), (1, 1)),
    ("1d-restricted-strided", "layout s = grid(37)\nmask m = (dilated(3, 3) & sink(7)) | sliding_window(4)",
     (16,), (16,), (1,)),
    ("2d-one-dim-mixed", ("layout g = grid(9, 13)\nmask m = neighborhood(window=(3, 4), dilation=(2, 3)) "
                          "| neighborhood(window=(2, 4), dilation=(1, 3))"), (4, 4), (2, 8), (1, 3)),
]


@pytest.mark.parametrize("name,text,q_tile,kv_tile,dilation", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("tma", ["1", "0"])
def test_mixed_dilations_match_reference(monkeypatch, name, text, q_tile, kv_tile, dilation, tma):
    monkeypatch.setenv("MASKDSL_TMA", tma)
    spec = maskdsl.parse(text)
    mask = spec.masks[0]
    plan = build_plan(mask, KernelConfig(q_tile, kv_tile))
    assert tuple(d.dilation for d in plan.dims) == dilation
    assert dilation == layout_dilation(products(mask.expr, mask.layout.shape), mask.layout.rank)
    o, lse, ref, ref_lse = run_case(text, q_tile, kv_tile)  # seeded from the case (case_seed)
    assert rel_err(o, ref) < 2e-3
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=1e-4, atol=1e-4)
    assert torch.all(o[~finite] == 0)


def test_strided_term_source_reads_its_phase():
    """The dilated term's predicate checks the key's phase; nothing prints an identity."""
    spec = maskdsl.parse(CASES[0][1])
    src = maskdsl.compile(spec, "m", KernelConfig((4, 4), (2, 8))).source
    assert "% 2 == 0" in src  # keys in phase with the row's first key, dilation 2
    for noop in ("// 1", "+ 0)", " 1 * ", "_fdiv"):
        assert noop not in src, noop
    assert max(len(line) for line in src.splitlines()) <= 115
