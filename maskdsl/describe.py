"""One-line, human descriptions of masks, and their exact density (for `maskdsl check`)."""

from __future__ import annotations


from maskdsl.spec import ir
from maskdsl.analysis.counts import attended_pairs


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
    if isinstance(expr, ir.Document):
        return "within each document (offsets passed at call time)"
    if isinstance(expr, ir.Prefix):
        return "each document's prefix (lengths passed at call time)"
    joiner = " or " if isinstance(expr, ir.Union_) else " and "
    return "(" + joiner.join(describe(t, rank) for t in expr.terms) + ")"


def percent(x: float) -> str:
    """Four decimals, or three significant digits for a density too small for them (never a bare 0.0000%)."""
    return f"{x:.4%}" if x == 0 or x >= 1e-4 else f"{x * 100:.3g}%"


def density_line(mask: ir.MaskDef) -> str:
    """Exact density of a static mask; for top-k, what is exact (the static part) and a bound on the rest.

    A top-k mask is S | (picked & R) (`maskdsl.harness.topk.normal_form`): S is attended whatever the data,
    R only limits where picks may land. So S's density is exact, the picks add at most k blocks of
    keys per query row, and the whole never exceeds S | R. The restriction R is not a static part.
    """
    tokens = mask.layout.tokens
    shape = mask.layout.shape
    if mask.documents:
        return "density depends on the documents passed at each call"
    if not mask.dynamic:
        pairs = attended_pairs(mask.expr, shape)  # an exact Python int
        return f"density {percent(pairs / tokens**2)} ({tokens**2 / pairs:.2f}x FLOP-ideal)" if pairs else \
            "density 0 (empty mask)"
    from maskdsl.harness.topk import block_count, normal_form  # torch: only top-k masks pay for it

    form = normal_form(mask.expr)
    blocks = block_count(shape, form.topk.block)
    keep = min(form.topk.k, blocks)
    text = f"top-k keeps {keep} of {blocks} key blocks"
    restricted = not isinstance(form.restrict, ir.Full)
    if form.static is None and not restricted:
        return text + f" (expected density {keep / blocks:.2%})"
    if restricted:
        text += f" among those {form.restrict.fmt()} reaches, and only its pairs inside them"
    static = attended_pairs(form.static, shape) / tokens**2 if form.static is not None else 0.0
    text += f"; static part density {percent(static)}" if form.static is not None else "; no static part"
    envelope = ir.union(*[e for e in (form.static, form.restrict) if e is not None])
    bound = min(attended_pairs(envelope, shape) / tokens**2, static + keep * form.topk.volume / tokens)
    return text + f"; density at most {bound:.2%}"
