"""The rules a Spec must satisfy, however it was built: by the parser, or by hand in Python.

The parser applies them while it still knows where each value came from (file:line:col);
`validate_spec` applies the same rules to a `Spec` built from `maskdsl.spec.ir` dataclasses, which the
front door (`maskdsl.compile`, `maskdsl.codegen.build.compile_attention`) is handed with no
guarantee at all: a name with a newline, a window of "3", a 10**12-token grid. Names and numbers
reach generated code, the cache and the analysis only after this.
"""

from __future__ import annotations

import re

from maskdsl.spec import ir, limits
from maskdsl.spec.errors import SpecError
from maskdsl.lang.primitives import PRIMITIVES, domain_problem

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # the grammar's NAME token
RESERVED = set(PRIMITIVES) | {"grid", "layout", "mask", "attention", "on", "true", "false"}
WHERE = "<Spec built in Python>"


def name_problem(name, kind: str) -> str | None:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        return f"{kind} name {name!r} is not a name (letters, digits and _, not starting with a digit)"
    if name in RESERVED:
        return f"{name!r} is a reserved word and cannot name a {kind}"
    return None


def attention_problem(a: dict) -> tuple[str, str, str | None] | None:
    """(message, field, hint) for an attention statement's values (`mask` is checked by the caller)."""
    for key in ("heads", "batch"):
        if a[key] < 1:
            return f"{key}={a[key]} must be positive", key, None
        if a[key] > limits.MAX_TOKENS:
            return f"{key}={a[key]} is larger than {limits.MAX_TOKENS}", key, "the kernels index programs with 32-bit integers"
    kv = a["kv_heads"] or a["heads"]
    if kv < 1 or a["heads"] % kv:
        return (f"kv_heads={kv} must divide heads={a['heads']}", "kv_heads",
                "grouped-query attention shares each kv head among heads/kv_heads query heads")
    if a["head_dim"] not in limits.SPEC_HEAD_DIMS:
        return (f"head_dim={a['head_dim']} is not supported", "head_dim",
                "use a multiple of 8 from 16 to 256 (top-k masks: a power of two)")
    if a["dtype"] not in ir.SPEC_DTYPES:
        return f"unknown dtype {a['dtype']!r}", "dtype", f"dtypes: {', '.join(ir.SPEC_DTYPES)}"
    return None


def expression_size(expr: ir.MaskExpr) -> tuple[int, int]:
    """(levels of `|`/`&` the parser counts in `expr.fmt()`, primitives in it), without recursion.

    lark reads `a | b | c` as `(a | b) | c`: the i-th of n flattened terms (1-based) sits under
    n - i + 1 operators, the first under n - 1. Named masks are shared objects in the inlined IR,
    so both numbers are memoised per node: a mask reused a thousand times is walked once.
    """
    depth: dict[int, int] = {}
    leaves: dict[int, int] = {}
    stack = [(expr, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in depth:
            continue
        terms = node.terms if isinstance(node, (ir.Union_, ir.Intersection)) and isinstance(node.terms, tuple) else ()
        if not terms:
            depth[id(node)], leaves[id(node)] = 0, 1
        elif done:
            n = len(terms)
            depth[id(node)] = max(depth[id(t)] + (n - 1 if i == 0 else n - i) for i, t in enumerate(terms))
            leaves[id(node)] = sum(leaves[id(t)] for t in terms)
        else:
            stack.append((node, True))
            stack.extend((t, False) for t in terms if id(t) not in depth)
    return depth[id(expr)], leaves[id(expr)]


def expression_problem(expr: ir.MaskExpr) -> tuple[str, str] | None:
    """(reason, hint) when the mask, named masks inlined, is deeper or larger than the limits."""
    levels, leaves = expression_size(expr)
    if levels > limits.MAX_DEPTH:
        return (f"with the masks it names written out, the expression nests {levels} levels of `|`/`&`, "
                f"more than {limits.MAX_DEPTH}", "`fmt` writes named masks out in full, and a chain of n terms "
                "joined by `|` (or `&`) is n - 1 levels: use fewer terms or fewer levels of named masks")
    if leaves > limits.MAX_LEAVES:
        return (f"with the masks it names written out, the expression holds {leaves:,} primitives, more than "
                f"{limits.MAX_LEAVES}", "each use of a named mask copies it; combine fewer copies")
    return None


def validate_spec(spec) -> ir.Spec:
    """Check every name and number of `spec`; return it unchanged, or raise SpecError naming the field."""
    if not isinstance(spec, ir.Spec):
        raise SpecError(f"expected a maskdsl.Spec, got {type(spec).__name__}", filename=WHERE)
    for field, cls in (("layouts", ir.Layout), ("masks", ir.MaskDef), ("attentions", ir.Attention)):
        items = getattr(spec, field)
        if not isinstance(items, tuple) or not all(isinstance(x, cls) for x in items):
            _fail(f"Spec.{field} must be a tuple of maskdsl.spec.ir.{cls.__name__}")
    for kind, items in (("layout", spec.layouts), ("mask", spec.masks), ("attention", spec.attentions)):
        names = [x.name for x in items]
        for name in names:
            if (problem := name_problem(name, kind)) is not None:
                _fail(problem)
        if len(set(names)) != len(names):
            _fail(f"duplicate {kind} names in {names}")
    for layout in spec.layouts:
        _check_layout(layout)
    layouts = {layout.name: layout for layout in spec.layouts}
    for mask in spec.masks:
        if layouts.get(mask.layout.name) != mask.layout:
            _fail(f"mask {mask.name}: its layout {mask.layout.name!r} {getattr(mask.layout, 'shape', None)!r} is not "
                  f"one of spec.layouts ({', '.join(layouts) or 'none'})", "put the mask's Layout in Spec.layouts")
        _check_layout(mask.layout)
        where = f"mask {mask.name}"
        if (problem := expression_problem(mask.expr)) is not None:  # first: the walk below does not memoise
            _fail(f"{where}: {problem[0]}", problem[1])
        _check_expr(mask.expr, mask.layout, where, 0)
        if ir.has_documents(mask.expr):
            from maskdsl.spec.documents import DocumentProblem, document_form

            try:
                document_form(mask.expr, mask.layout.shape)
            except DocumentProblem as exc:
                _fail(f"{where}: {exc}", exc.hint)
            continue
        from maskdsl.analysis.counts import NotAnalyzable, check_analyzable

        try:
            check_analyzable(mask.expr, mask.layout.shape)
        except NotAnalyzable as exc:
            _fail(f"{where}: {exc}")
    masks = {m.name for m in spec.masks}
    for att in spec.attentions:
        values = {f: getattr(att, f) for f in ("heads", "kv_heads", "head_dim", "batch")}
        if not all(_is_int(v) for v in values.values()):
            _fail(f"attention {att.name}: heads, kv_heads, head_dim and batch must be integers, got {values}")
        if att.mask not in masks:
            _fail(f"attention {att.name}: unknown mask {att.mask!r}")
        problem = attention_problem({**values, "dtype": att.dtype})
        if problem is not None:
            _fail(f"attention {att.name}: {problem[0]}", problem[2])
    return spec


def _fail(message: str, hint: str | None = None):
    raise SpecError(message, filename=WHERE, hint=hint)


def _is_int(v) -> bool:
    return type(v) is int  # not bool, not a float that happens to be whole, not a string of digits


def _check_layout(layout: ir.Layout) -> None:
    shape = layout.shape
    if not isinstance(shape, tuple) or not 1 <= len(shape) <= 3 or not all(_is_int(n) for n in shape):
        _fail(f"layout {layout.name}: shape must be a tuple of 1 to 3 integers, got {shape!r}")
    if any(n < 1 for n in shape):
        _fail(f"layout {layout.name}: grid extents must be positive, got {shape}")
    if (problem := limits.shape_problem(shape)) is not None:
        _fail(f"layout {layout.name}: {problem[0]}", problem[2])


def _check_expr(expr, layout: ir.Layout, where: str, level: int) -> None:
    if level > limits.MAX_DEPTH:
        _fail(f"{where}: the expression nests more than {limits.MAX_DEPTH} levels")
    rank = layout.rank
    if isinstance(expr, (ir.Union_, ir.Intersection)):
        if not isinstance(expr.terms, tuple) or len(expr.terms) < 2:
            _fail(f"{where}: a {type(expr).__name__} needs a tuple of at least two terms")
        for t in expr.terms:
            _check_expr(t, layout, where, level + 1)
        return
    if isinstance(expr, ir.Neighborhood):
        for field, kind in (("window", int), ("dilation", int), ("stride", int), ("causal", bool)):
            value = getattr(expr, field)
            ok = isinstance(value, tuple) and len(value) == rank and all(
                type(v) is kind for v in value)
            if not ok:
                _fail(f"{where}: neighborhood {field} must be a tuple of {rank} {kind.__name__}s "
                      f"(one per dimension of {layout.name}), got {value!r}")
    elif isinstance(expr, ir.Sink):
        if not _is_int(expr.n):
            _fail(f"{where}: sink n must be an integer, got {expr.n!r}")
    elif isinstance(expr, ir.TopK):
        block = expr.block if isinstance(expr.block, tuple) else (expr.block,)
        if not (_is_int(expr.k) and block and all(_is_int(b) for b in block)) or max(expr.k, *block) > limits.MAX_INT:
            _fail(f"{where}: topk k and block must be integers of at most 2^63 - 1 (block: one per dimension), "
                  f"got {expr.k!r}, {expr.block!r}")
    elif not isinstance(expr, (ir.Causal, ir.Full, ir.Document, ir.Prefix)):
        _fail(f"{where}: {expr!r} is not a mask expression (maskdsl.spec.ir.{', '.join(c.__name__ for c in ir.PRIMITIVES)},"
              " Union_, Intersection)")
    problem = domain_problem(expr, layout)
    if problem is not None:
        _fail(f"{where}: {problem[0]}", problem[3])
