"""One rule for which Gluon forward mode runs a mask (maskdsl.analysis.gluon_rule): the simulator's verdict is
the one codegen builds tables for, on every suite and example mask; the rule's choices on masks that
tell the modes apart; the transposed whole-tile schedule against brute force."""

from pathlib import Path

import numpy as np
import pytest
import torch

import maskdsl
from maskdsl.analysis.counts import Rel1D, num_products
from maskdsl.codegen.config import KernelConfig
from maskdsl.codegen.dispatch import GLUON_TORCH_DTYPES
from maskdsl.codegen.dispatch import head_dim_blocker
from maskdsl.codegen.gluon_plan import GluonSchedule, plan_ranges, row_table
from maskdsl.codegen.plan import build_plan
from maskdsl.analysis.gluon_rule import GLUON_HEAD_DIMS
from maskdsl.analysis.gluon_rule import dtype_name, gluon_ranges, key_tile_visits
from maskdsl.lang.parser import load
from maskdsl.harness.semantics import static_mask
from maskdsl.simulator.gluon import gluon_plan
from maskdsl.simulator.ranking import _configs

ROOT = Path(__file__).resolve().parent.parent
MASK_FILES = sorted(str(p.relative_to(ROOT)) for p in [*(ROOT / "bench" / "suite").glob("*.mask"),
                                                       *(ROOT / "examples").glob("*.mask")])
SAMPLE = 48  # tile pairs per mask: all of them where there are fewer, else an even spread


def _pairs(shape) -> list:
    """The 128 x 128-token tile pairs `maskdsl simulate --sweep` ranks for this grid (an even sample)."""
    pairs = _configs(shape, None, True, 128, 128, 16, 256)
    if len(pairs) > SAMPLE:
        pairs = [pairs[i] for i in np.linspace(0, len(pairs) - 1, SAMPLE).round().astype(int)]
    return [(c.q_tile, c.kv_tile) for c in pairs]


def simulator_verdict(mask, q_tile, kv_tile, head_dim, dtype):
    """The mode the simulator predicts for (None: the template)."""
    plan = gluon_plan(mask.expr, mask.layout.shape, q_tile, kv_tile, True, head_dim, dtype, mask.dynamic)
    return plan.mode if plan.eligible else None


def codegen_verdict(mask, q_tile, kv_tile, head_dim, dtype):
    """The mode a compiled kernel launches the Gluon forward in for tensors of this head_dim and dtype on
    Hopper (None: the template): the schedule's, then the launch's own head_dim and dtype checks; the
    schedule's table is built."""
    if mask.dynamic:
        return None  # top-k masks compile to codegen.topk.forward, which has no Gluon forward
    ranges = plan_ranges(build_plan(mask, KernelConfig(q_tile, kv_tile, 4, 2)))
    if not ranges.ok:
        return None
    table = GluonSchedule(ranges).table
    assert len(table) == len(ranges.busy) and (table[:, 3:9:2] < table[:, 4:9:2]).all()
    if head_dim not in GLUON_HEAD_DIMS or getattr(torch, dtype_name(dtype), None) not in GLUON_TORCH_DTYPES:
        return None
    if ranges.mode == "boxes" and head_dim_blocker(head_dim) is not None:
        return None
    return ranges.mode


def disagreements(path: str, verdict=simulator_verdict) -> list[str]:
    """Every sampled tile pair of every mask in the file where `verdict` differs from codegen's."""
    spec = load(ROOT / path)
    out = []
    for mask in spec.masks:
        att = spec.attention_for(mask.name)
        head_dim, dtype = (att.head_dim, att.dtype) if att else (128, "bf16")
        for q, k in _pairs(mask.layout.shape):
            got, want = verdict(mask, q, k, head_dim, dtype), codegen_verdict(mask, q, k, head_dim, dtype)
            if got != want:
                out.append(f"{mask.name} q{q} k{k}: simulator {got}, codegen {want}")
    return out


@pytest.mark.parametrize("path", MASK_FILES)
def test_the_simulator_predicts_the_forward_codegen_runs(path):
    assert disagreements(path) == []


def test_the_agreement_check_fails_on_a_wrong_verdict():
    """A verdict that calls every 1-D mask whole-tile, and one blind to head_dim, both disagree."""
    def whole(mask, q, k, head_dim, dtype):
        return "whole"

    def any_head_dim(mask, q, k, head_dim, dtype):
        return simulator_verdict(mask, q, k, 128, dtype)

    assert any("simulator whole, codegen runs" in d for d in disagreements("bench/suite/causal_gqa_16k.mask", whole))
    assert any("codegen None" in d for d in disagreements("bench/suite/neighborhood_2d_d96.mask", any_head_dim))


def _verdict(layout, text, q=None, k=None, head_dim=None):
    mask = maskdsl.parse(f"layout g = {layout}\nmask m = {text}").masks[0]
    terms = [t.num for t in num_products(mask.expr, mask.layout.shape)]
    q = q or (1,) * (len(mask.layout.shape) - 1) + (64,)  # a 1-D order runs the kernel's 128 whatever the config
    return gluon_ranges(terms, mask.layout.shape, q, k or q, head_dim)


@pytest.mark.parametrize("layout,text,tiles,head_dim,mode", [
    ("grid(4096)", "block(512)", None, None, "whole"),
    ("grid(4096)", "causal", None, None, "runs"),
    ("grid(4000)", "full", None, None, "runs"),  # a ragged last tile: the whole-tile mode wants divisibility
    ("grid(4096)", "sliding_window(300, causal=true) | sink(4)", None, 64, "runs"),
    ("grid(4096)", "dilated(window=64, dilation=4)", None, None, None),
    ("grid(32, 64)", "neighborhood(window=(16, 64), stride=(8, 32))", ((4, 32), (4, 32)), None, "whole"),
    ("grid(32, 64)", "neighborhood(window=(9, 9))", ((4, 32), (4, 32)), 128, "boxes"),
    ("grid(32, 64)", "neighborhood(window=(9, 9))", ((4, 32), (4, 32)), 64, None),
    ("grid(32, 64)", "neighborhood(window=(9, 9)) | sink(4)", ((4, 32), (4, 32)), 128, None),
    ("grid(32, 64)", "neighborhood(window=(9, 9))", ((4, 16), (4, 32)), 128, None),  # 64-token query tiles
])
def test_modes_in_order_of_preference(layout, text, tiles, head_dim, mode):
    q, k = tiles or (None, None)
    r = _verdict(layout, text, q, k, head_dim)
    assert r.mode == mode, r.reason
    assert (r.reason is None) == (mode is not None)


def test_a_refusal_gives_each_modes_reason():
    r = _verdict("grid(32, 64)", "neighborhood(window=(9, 9))", (4, 32), (4, 32), 64)
    assert "partially seen" in r.reason and "predicated: " in r.reason and "head_dim 128 only" in r.reason


def test_a_union_that_is_one_box_only_across_a_leading_dimension_is_refused():
    """Two terms side by side in dimension 0 (query row 0 sees key row 0 through one, key row 1 through
    the other): their union is one box of key tiles, but the kernel's merge takes boxes that agree
    before the last dimension only. The simulator's rule once passed it; codegen's, now the one rule,
    does not."""
    n0, n1 = 2, 128

    def rel(n, lo, hi):
        return Rel1D(n, 1, np.asarray(lo, np.int64), np.asarray(hi, np.int64))

    every = rel(n1, [0] * n1, [n1 - 1] * n1)
    terms = [(rel(n0, [0, 1], [0, -1]), every), (rel(n0, [1, 1], [1, -1]), every)]  # row 1 of dim 0 sees nothing
    r = gluon_ranges(terms, (n0, n1), (1, 128), (1, 128))
    assert r.mode is None and "differ before the last dimension" in r.reason


def test_row_tables_hold_what_the_ranges_say():
    """Columns by tile_table's names agree with the ranges' arrays, in dispatch order, for each mode."""
    from maskdsl.analysis import tile_table as tt

    for layout, text, tiles in (("grid(4096)", "block(512)", None), ("grid(4096)", "causal | sink(4)", None),
                                ("grid(32, 64)", "neighborhood(window=(9, 9))", (4, 32))):
        r = _verdict(layout, text, tiles, tiles, 128)
        table, rows = row_table(r), r.order
        assert table.shape == (len(rows), tt.WIDTH[r.mode])
        for d in range(tt.RANK):
            assert table[:, tt.COORD + d].tolist() == r.coords(rows)[:, d].tolist()
            assert table[:, tt.box_lo(d)].tolist() == r.lo[rows, d].tolist()
            assert table[:, tt.box_hi(d)].tolist() == r.hi[rows, d].tolist()
            if r.mode == "boxes":
                assert table[:, tt.full_lo(d)].tolist() == r.full_lo[rows, d].tolist()
        if r.mode == "runs":
            assert table[:, tt.RUN2].tolist() == r.run2[rows, 0].tolist()
            assert table[:, tt.FLAG].tolist() == r.flag[rows].astype(int).tolist()


def _brute_visits(expr, shape, q_tile, kv_tile):
    """{key tile: sorted query tiles} that attend at least one pair of it, from the [L, L] mask."""
    m = static_mask(expr, shape).numpy()
    coords = np.stack(np.unravel_index(np.arange(m.shape[0]), shape), axis=1)
    qt = np.ravel_multi_index(tuple((coords // np.array(q_tile)).T), tuple(-(-n // t) for n, t in zip(shape, q_tile)))
    kt = np.ravel_multi_index(tuple((coords // np.array(kv_tile)).T), tuple(-(-n // t) for n, t in zip(shape, kv_tile)))
    out = {}
    for i, j in zip(*np.nonzero(m)):
        out.setdefault(int(kt[j]), set()).add(int(qt[i]))
    return {k: sorted(v) for k, v in out.items()}


@pytest.mark.parametrize("layout,text,q,k", [
    ("grid(1024)", "block(256) | block(512)", (128,), (128,)),
    ("grid(1024)", "sink(128) & block(256)", (64,), (64,)),
    ("grid(32, 32)", "neighborhood(window=(24, 24), stride=(8, 8))", (8, 8), (8, 8)),
    ("grid(4, 16, 16)", "block((2, 8, 8))", (2, 4, 8), (1, 8, 8)),
    ("grid(8, 64)", "block((8, 16)) | block((8, 64))", (8, 16), (8, 16)),
])
def test_the_transposed_schedule_is_the_brute_force_one(layout, text, q, k):
    mask = maskdsl.parse(f"layout g = {layout}\nmask m = {text}").masks[0]
    shape = mask.layout.shape
    r = gluon_ranges([t.num for t in num_products(mask.expr, shape)], shape, q, k, as_given=True)
    assert r.mode == "whole", r.reason
    t = key_tile_visits(r)
    want = _brute_visits(mask.expr, shape, q, k)
    assert len(t.offsets) == int(np.prod(t.k_tiles)) + 1
    for key in range(int(np.prod(t.k_tiles))):
        assert t.of(key).tolist() == want.get(key, []), f"key tile {key}"


def test_the_transposed_schedule_is_the_whole_tile_modes_only():
    with pytest.raises(ValueError, match="whole-tile"):
        key_tile_visits(_verdict("grid(4096)", "causal"))
