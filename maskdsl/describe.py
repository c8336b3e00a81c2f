"""One-line, human descriptions of masks, and their exact density (for `maskdsl check`)."""

from __future__ import annotations

import math

from maskdsl import ir
from maskdsl.analysis import attended_pairs, static_part


def _dims(values) -> str:
    return "x".join(map(str, values))


def describe(expr: ir.MaskExpr, rank: int) -> str:
    if isinstance(expr, ir.Neighborhood):
        causal = [i for i, c in enumerate(expr.causal) if c]
        if all(w == s for w, s in zip(expr.window, expr.stride)) and not causal and all(d == 1 for d in expr.dilation):
            return f"{rank}-D blocks of {_dims(expr.window)}"
        text = f"{rank}-D {'causal ' if causal and len(causal) == rank else ''}neighborhood {_dims(expr.window)}"
        if any(s != 1 for s in expr.stride):
            text += f", stride {_dims(expr.stride)}"
        if any(d != 1 for d in expr.dilation):
            text += f", dilation {_dims(expr.dilation)}"
        if causal and len(causal) < rank:
            text += f", causal in dimension(s) {', '.join(map(str, causal))}"
        return text
    if isinstance(expr, ir.Causal):
        return "causal (row-major token order)"
    if isinstance(expr, ir.Full):
        return "dense"
    if isinstance(expr, ir.Sink):
        return f"{expr.n} global sink token(s)"
    if isinstance(expr, ir.TopK):
        return f"top-{expr.k} key blocks of {expr.block} tokens per query block (dynamic)"
    joiner = " or " if isinstance(expr, ir.Union_) else " and "
    return "(" + joiner.join(describe(t, rank) for t in expr.terms) + ")"


def percent(x: float) -> str:
    """Four decimals, or three significant digits for a density too small for them (never a bare 0.0000%)."""
    return f"{x:.4%}" if x == 0 or x >= 1e-4 else f"{x * 100:.3g}%"


def density_line(mask: ir.MaskDef) -> str:
    """Exact density of the static part; for top-k, the expected density it adds is said as such."""
    tokens = mask.layout.tokens
    static = static_part(mask.expr)
    if not mask.dynamic:
        pairs = attended_pairs(mask.expr, mask.layout.shape)  # an exact Python int
        return f"density {percent(pairs / tokens**2)} ({tokens**2 / pairs:.2f}x FLOP-ideal)" if pairs else \
            "density 0 (empty mask)"
    topk = next(n for n in ir.walk(mask.expr) if isinstance(n, ir.TopK))
    blocks = math.ceil(tokens / topk.block)
    expected = min(topk.k, blocks) / blocks
    text = f"top-k keeps {min(topk.k, blocks)} of {blocks} key blocks (expected density {expected:.2%})"
    if static is not None and not isinstance(static, ir.Full):
        text += f"; static part density {percent(attended_pairs(static, mask.layout.shape) / tokens**2)}"
    return text
