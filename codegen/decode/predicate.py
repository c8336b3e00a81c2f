"""A static mask as a jitted Triton predicate `attends(q_pos, k_pos)` over flat row-major positions.

The decode kernel takes it as a constexpr function. The text composes the primitives the way the
oracle does (maskdsl/harness/semantics.py `attends`): a neighborhood holds in every dimension (each
dimension's rule is `codegen.decode.kernel.neighborhood`), `causal` compares flat positions,
`sink(n)` opens the first n tokens both ways, `|` and `&` combine. It is rendered once per mask and
loaded through the verifying kernel cache (codegen.cache), so a reader finds it beside the other kernels.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from maskdsl.codegen.cache import load_module
from maskdsl.codegen.render import comment_safe
from maskdsl.spec import ir

_HERE = Path(__file__).parent


def expression(expr: ir.MaskExpr, shape: tuple[int, ...]) -> str:
    """The predicate's body as one Triton expression of `q_<d>`/`k_<d>` (coordinates) and `qf`/`kf` (flat)."""
    if isinstance(expr, ir.Neighborhood):
        parts = [f"neighborhood(q_{d}, k_{d}, {n}, {expr.window[d]}, {expr.dilation[d]}, {expr.stride[d]}, "
                 f"{expr.causal[d]})" for d, n in enumerate(shape)]
        return " & ".join(f"({p})" for p in parts) if len(parts) > 1 else parts[0]
    if isinstance(expr, ir.Causal):
        return "(qf >= kf)"
    if isinstance(expr, ir.Full):
        return "((qf >= 0) & (kf >= 0))"
    if isinstance(expr, ir.Sink):
        return f"((qf < {expr.n}) | (kf < {expr.n}))"
    if isinstance(expr, (ir.Union_, ir.Intersection)):
        op = " | " if isinstance(expr, ir.Union_) else " & "
        return "(" + op.join(expression(t, shape) for t in expr.terms) + ")"
    raise ValueError(f"{expr.fmt()} depends on the data: decode runs static masks (docs/SERVING.md)")


def render(mask: ir.MaskDef) -> str:
    """The module's source: the coordinates of both positions, then the mask's expression."""
    shape = tuple(mask.layout.shape)
    lines = ["# maskdsl decode predicate (rendered; docs/SERVING.md)",
             f"# mask: {comment_safe(mask.expr.fmt())} on grid{shape}",
             "import triton", "import triton.language as tl", "",
             "from maskdsl.codegen.decode.kernel import neighborhood  # noqa: F401", "", "",
             "@triton.jit", "def attends(qf, kf):"]
    for side in ("q", "k"):
        flat = f"{side}f"
        inner = 1
        for d in reversed(range(len(shape))):
            divided = flat if inner == 1 else f"({flat} // {inner})"
            coord = divided if d == 0 else f"{divided} % {shape[d]}"
            lines.append(f"    {side}_{d} = {coord}")
            inner *= shape[d]
    lines.append(f"    return {expression(mask.expr, shape)}")
    return "\n".join(lines) + "\n"


def load_predicate(mask: ir.MaskDef):
    """The jitted `attends` of `mask`, from the kernel cache (keyed by the mask and this renderer)."""
    digest = hashlib.sha256()
    for name in ("predicate.py", "kernel.py"):
        digest.update((_HERE / name).read_bytes())
    key = f"decode_{mask.content_hash()}_{digest.hexdigest()[:12]}"
    module, _ = load_module(key, lambda: render(mask))
    return module.attends
