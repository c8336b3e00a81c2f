"""The top-k normal form S | (picked & R): one rewrite, torch-free, so the parser and analysis can use it.

`maskdsl.harness.topk` (selection, reference) and the kernels build on it; the analysis checks S and R at
parse time without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from maskdsl.spec import ir


@dataclass(frozen=True)
class TopKForm:
    topk: ir.TopK
    static: ir.MaskExpr | None  # S
    restrict: ir.MaskExpr  # R (Full when unrestricted)


def normal_form(expr: ir.MaskExpr) -> TopKForm:
    """Rewrite a mask with exactly one top-k term as S | (picked & R)."""
    if isinstance(expr, ir.TopK):
        return TopKForm(expr, None, ir.Full())
    if isinstance(expr, ir.Union_):
        dyn = [t for t in expr.terms if ir.is_dynamic(t)]
        if len(dyn) != 1:
            raise ValueError("a mask may hold one top-k term; combine several selections into one topk(...)")
        inner = normal_form(dyn[0])
        static = [t for t in expr.terms if not ir.is_dynamic(t)] + ([inner.static] if inner.static else [])
        return TopKForm(inner.topk, ir.union(*static), inner.restrict)
    if isinstance(expr, ir.Intersection):
        dyn = [t for t in expr.terms if ir.is_dynamic(t)]
        if len(dyn) != 1:
            raise ValueError("a mask may hold one top-k term; combine several selections into one topk(...)")
        inner = normal_form(dyn[0])
        others = [t for t in expr.terms if not ir.is_dynamic(t)]
        static = ir.intersection(inner.static, *others) if inner.static else None
        restrict = ir.intersection(*([inner.restrict] if not isinstance(inner.restrict, ir.Full) else []), *others)
        return TopKForm(inner.topk, static, restrict)
    raise ValueError(f"{expr.fmt()} has no top-k term")
