"""The printed bounds (codegen.bounds through codegen.printer) against the analysis' exact values.

Folding idle clamps, sharing subexpressions and renaming must never change a bound the kernel uses:
run the printed lines with numpy standing in for `tl` on every valid row, and compare with
`maskdsl.analysis.intervals.evaluate` (the language layer's own integer evaluation).
"""

import numpy as np
import pytest

import maskdsl
from maskdsl.analysis.counts import layout_dilation, products
from maskdsl.codegen.bounds import KernelDim, term_text
from maskdsl.codegen.plan import DimPlan, TermDim
from maskdsl.codegen.printer import Temps
from maskdsl.analysis.intervals import evaluate


class _TL:
    minimum, maximum, where = staticmethod(np.minimum), staticmethod(np.maximum), staticmethod(np.where)


def _fdiv(a, b):
    return np.floor_divide(a, b)


MASKS = [
    ("grid(30)", "sliding_window(15)"),
    ("grid(31)", "neighborhood(window=12, stride=4, causal=true)"),
    ("grid(50)", "dilated(window=5, dilation=3)"),
    ("grid(23)", "dilated(window=5, dilation=2) & sliding_window(6)"),
    ("grid(23)", "dilated(2, 2) & sliding_window(3) & causal"),
    ("grid(40)", "sink(3) & neighborhood(window=2)"),
    ("grid(37)", "(dilated(3, 3) & sink(7)) | sliding_window(4)"),  # a strided term with a query range
    ("grid(45)", "sliding_window(3) | dilated(3, 4)"),
    ("grid(33)", "causal"),
]


@pytest.mark.parametrize("layout,text", MASKS)
def test_printed_row_bounds_equal_the_analysis(layout, text):
    spec = maskdsl.parse(f"layout s = {layout}\nmask m = {text}")
    n = spec.masks[0].layout.shape[0]
    terms = products(spec.masks[0].expr, (n,))
    d = layout_dilation(terms, 1)[0]
    dim = KernelDim(0, DimPlan(n, 1, d, 16, 16), 1, 1)
    c = np.arange(n)
    for t, term in enumerate(terms):
        rel = term.sym[0]
        text_ = term_text(str(t), (TermDim.of(rel, n),), [dim], Temps(), full=False)
        env = {"tl": _TL, "_fdiv": _fdiv, "rows_0": c // d, "g_0": c % d, "n_0": (n - c % d + d - 1) // d}
        exec("\n".join(text_.rows), {}, env)
        lo, hi = np.broadcast_to(env[f"lo_{t}_0"], (n,)), np.broadcast_to(env[f"hi_{t}_0"], (n,))
        want_lo, want_hi = evaluate(rel, n)
        e = rel.dilation
        if e != d:  # strided: printed in the dimension's own coordinates, keys of the row's phase
            want_lo, want_hi = c % e + e * want_lo, c % e + e * want_hi
        seen = want_lo <= want_hi
        assert np.array_equal(lo <= hi, seen), (text, t)
        np.testing.assert_array_equal(lo[seen], want_lo[seen], err_msg=f"{text} term {t}")
        np.testing.assert_array_equal(hi[seen], want_hi[seen], err_msg=f"{text} term {t}")
