"""A mask as jitted Triton predicates over flat row-major positions: `attends(q_pos, k_pos)`.

The decode kernel takes it as a constexpr function. The text composes the primitives the way the
oracle does (maskdsl/harness/semantics.py `attends`): a neighborhood holds in every dimension (each
dimension's rule is `codegen.decode.kernel.neighborhood`), `causal` compares flat positions,
`sink(n)` opens the first n tokens both ways, `|` and `&` combine. It is rendered once per mask and
loaded through the verifying kernel cache (codegen.cache), so a reader finds it beside the other kernels.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

from maskdsl.codegen.cache import load_module
from maskdsl.codegen.render import comment_safe
from maskdsl.spec import ir
from maskdsl.spec.topk_form import normal_form

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
    raise ValueError(f"{expr.fmt()} depends on the data: render its normal form's parts (S, R)")


def _coords(flat: str, side: str, shape: tuple[int, ...]) -> list[str]:
    """Lines giving `<side>_<d>`, the row-major coordinates of the flat position `flat`."""
    lines, inner = [], 1
    for d in reversed(range(len(shape))):
        divided = flat if inner == 1 else f"({flat} // {inner})"
        lines.append(f"    {side}_{d} = {divided if d == 0 else f'{divided} % {shape[d]}'}")
        inner *= shape[d]
    return lines[::-1]


def _function(name: str, expr: ir.MaskExpr | None, shape: tuple[int, ...]) -> list[str]:
    """`name(qf, kf)`: the expression over both positions (None: no pair)."""
    body = expression(expr, shape) if expr is not None else "(qf < 0) & (kf < 0)"
    return ["@triton.jit", f"def {name}(qf, kf):", *_coords("qf", "q", shape), *_coords("kf", "k", shape),
            f"    return {body}", "", ""]


def _blocks(shape: tuple[int, ...], block: tuple[int, ...]) -> list[str]:
    """`key_block(kf)`: the top-k block of a flat key (row-major over the block grid, maskdsl.harness.topk);
    `block_first(j)`, `block_last(j)`: the first and last flat key of block j (cut by the grid)."""
    grid = [-(-n // b) for n, b in zip(shape, block)]
    index = " + ".join(f"(k_{d} // {b}) * {math.prod(grid[d + 1:])}" for d, b in enumerate(block))
    lines = ["@triton.jit", "def key_block(kf):", *_coords("kf", "k", shape), f"    return {index}", "", ""]
    for name, corner in (("block_first", "j_{d} * {b}"), ("block_last", "tl.minimum(j_{d} * {b} + {b}, {n}) - 1")):
        flat = "0"
        for d, (n, b) in enumerate(zip(shape, block)):
            term = corner.format(d=d, b=b, n=n)
            flat = term if flat == "0" else f"({flat}) * {n} + {term}"
        lines += ["@triton.jit", f"def {name}(j):", *_coords("j", "j", tuple(grid)), f"    return {flat}", "", ""]
    return lines


def render(mask: ir.MaskDef) -> str:
    """The module's source: `attends` (the mask; with a top-k term its static part S), and with a top-k
    term `restrict` (R) and the block geometry (`key_block`, `block_first`, `block_last`)."""
    shape = tuple(mask.layout.shape)
    lines = ["# maskdsl decode predicate (rendered; docs/SERVING.md)",
             f"# mask: {comment_safe(mask.expr.fmt())} on grid{shape}",
             "import triton", "import triton.language as tl", "",
             "from maskdsl.codegen.decode.kernel import neighborhood  # noqa: F401", "", ""]
    if mask.dynamic:
        form = normal_form(mask.expr)
        lines += _function("attends", form.static, shape) + _function("restrict", form.restrict, shape)
        lines += _blocks(shape, form.topk.block)
    else:
        lines += _function("attends", mask.expr, shape)
    return "\n".join(lines).rstrip() + "\n"


def load_predicate(mask: ir.MaskDef):
    """The rendered module of `mask` (its jitted functions), from the kernel cache (keyed by the mask and
    this renderer)."""
    digest = hashlib.sha256()
    for name in ("predicate.py", "kernel.py"):
        digest.update((_HERE / name).read_bytes())
    key = f"decode_{mask.content_hash()}_{digest.hexdigest()[:12]}"
    module, _ = load_module(key, lambda: render(mask))
    return module
