"""The mask primitives the language knows: their signatures, their sugar, and their checks.

One table drives argument binding (positional/keyword, defaults, broadcasting of scalars to
every dimension) so that every primitive reports mistakes the same way. The checks mirror
the semantics' domain (docs/DESIGN.md §3): 1 <= w <= n, w*d <= n, 1 <= s <= w.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from maskdsl.spec import ir
from maskdsl.spec.errors import BindError, suggest
from maskdsl.lang.syntax import Call, Pos, Value


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "dims" (int per dimension), "flags" (bool per dimension), "int"
    default: object = None  # None: required


@dataclass(frozen=True)
class Primitive:
    name: str
    params: tuple[Param, ...]
    build: Callable[[dict, ir.Layout], ir.MaskExpr]
    doc: str
    rank1_only: bool = False


def _nbhd(window, dilation=None, stride=None, causal=None, *, rank):
    ones = (1,) * rank
    return ir.Neighborhood(window=window, dilation=dilation or ones, stride=stride or ones,
                           causal=causal or (False,) * rank)


PRIMITIVES: dict[str, Primitive] = {
    p.name: p
    for p in [
        Primitive("neighborhood",
                  (Param("window", "dims"), Param("dilation", "dims", 1), Param("stride", "dims", 1),
                   Param("causal", "flags", False)),
                  lambda a, lay: _nbhd(a["window"], a["dilation"], a["stride"], a["causal"], rank=lay.rank),
                  "NATTEN/GNA neighborhood attention per dimension"),
        Primitive("sliding_window", (Param("window", "dims"), Param("causal", "flags", False)),
                  lambda a, lay: _nbhd(a["window"], causal=a["causal"], rank=lay.rank),
                  "1-D sliding window (causal=true: keys i-w+1..i)", rank1_only=True),
        Primitive("dilated", (Param("window", "dims"), Param("dilation", "dims")),
                  lambda a, lay: _nbhd(a["window"], dilation=a["dilation"], rank=lay.rank),
                  "dilated neighborhood"),
        Primitive("strided", (Param("window", "dims"), Param("stride", "dims")),
                  lambda a, lay: _nbhd(a["window"], stride=a["stride"], rank=lay.rank),
                  "strided (GNA) neighborhood"),
        Primitive("block", (Param("size", "dims"),),
                  lambda a, lay: _nbhd(a["size"], stride=a["size"], rank=lay.rank),
                  "blocked attention (stride = window = size)"),
        Primitive("causal", (), lambda a, lay: ir.Causal(), "causal over the row-major token order"),
        Primitive("full", (), lambda a, lay: ir.Full(), "dense attention"),
        Primitive("sink", (Param("n", "int"),), lambda a, lay: ir.Sink(a["n"]),
                  "the first n tokens see and are seen by everything"),
        Primitive("topk", (Param("k", "int"), Param("block", "dims")),
                  lambda a, lay: ir.TopK(a["k"], a["block"]),
                  "dynamic: each query block (a box of the grid) keeps its k best key blocks"),
        Primitive("document", (), lambda a, lay: ir.Document(),
                  "within the query's own document; boundaries passed with each call (maskdsl.spec.documents)"),
        Primitive("prefix", (), lambda a, lay: ir.Prefix(),
                  "inside documents: the keys of each document's prefix, lengths passed with each call"),
    ]
}

# Written without parentheses in expressions (`causal`, `full`, `document`, `prefix`).
BARE_PRIMITIVES = ("causal", "full", "document", "prefix")


def bind_call(call: Call, layout: ir.Layout) -> ir.MaskExpr:
    prim = PRIMITIVES.get(call.name)
    if prim is None:
        hint = "primitives: " + ", ".join(PRIMITIVES)
        raise BindError(f"unknown primitive {call.name!r}{suggest(call.name, PRIMITIVES)}", call.pos, hint)
    if prim.rank1_only and layout.rank != 1:
        raise BindError(f"{call.name} works on a 1-D layout, but {layout.name!r} has {layout.rank} dimensions",
                        call.pos, f"use neighborhood(window=...) for a {layout.rank}-D window")
    values = bind_args(call, prim.params, f"{call.name}()")
    args = {p.name: _convert(p, values[p.name], layout, call.name) for p in prim.params}
    expr = prim.build(args, layout)
    check_expr(expr, layout, values)
    return expr


def bind_args(call: Call, params: tuple[Param, ...], what: str) -> dict[str, Value]:
    """Match positional and keyword arguments to parameters; fill defaults."""
    names = [p.name for p in params]
    bound: dict[str, Value] = {}
    for index, arg in enumerate(call.args):
        if arg.key is None:
            if bound and any(a.key is not None for a in call.args[:index]):
                raise BindError("positional argument after a keyword argument", arg.pos)
            if index >= len(params):
                raise BindError(f"{what} takes {len(params)} argument(s), got {len(call.args)}", arg.pos,
                                f"parameters: {', '.join(names) or 'none'}")
            key = names[index]
        else:
            key = arg.key
            if key not in names:
                raise BindError(f"unknown keyword {key!r} for {what}{suggest(key, names)}", arg.pos,
                                f"parameters: {', '.join(names) or 'none'}")
        if key in bound:
            raise BindError(f"argument {key!r} given twice", arg.pos)
        bound[key] = arg.value
    for p in params:
        if p.name not in bound:
            if p.default is None:
                raise BindError(f"{what} needs the argument {p.name!r}", call.pos,
                                f"write {call.name}({', '.join(q.name + '=...' for q in params if q.default is None)})")
            kind = "bool" if isinstance(p.default, bool) else "word" if isinstance(p.default, str) else "int"
            bound[p.name] = Value(kind, p.default, call.pos)
    return bound


def _convert(param: Param, value: Value, layout: ir.Layout, prim: str):
    want = "bool" if param.kind == "flags" else "int"
    if param.kind == "int":
        if value.kind != "int":
            raise BindError(f"{prim}: {param.name} must be an integer, got {value.describe()}", value.pos)
        return value.value
    items = value.value if value.kind == "tuple" else (value,)
    for item in items:
        if item.kind != want:
            raise BindError(f"{prim}: {param.name} takes {'true/false' if want == 'bool' else 'integers'}, "
                            f"got {item.describe()}", item.pos)
    if value.kind != "tuple":
        return (value.value,) * layout.rank
    if len(items) != layout.rank:
        raise BindError(f"{prim}: {param.name} has {len(items)} entries but layout {layout.name!r} "
                        f"has {layout.rank} dimensions {layout.shape}", value.pos,
                        "give one entry per dimension, or a scalar to use it in every dimension")
    return tuple(i.value for i in items)


def _element_pos(value: Value, dim: int) -> Pos:
    return value.value[dim].pos if value.kind == "tuple" and dim < len(value.value) else value.pos


def check_expr(expr: ir.MaskExpr, layout: ir.Layout, values: dict[str, Value]) -> None:
    """The domain checks of `domain_problem`, pointed at the argument that breaks them."""
    problem = domain_problem(expr, layout)
    if problem is None:
        return
    message, param, dim, hint = problem
    if param not in values:  # sugar: block(size) is window = stride = size; strided/dilated name their own
        param = "size" if "size" in values else "window"
    value = values[param]
    raise BindError(message, value.pos if dim is None else _element_pos(value, dim), hint)


def domain_problem(expr: ir.MaskExpr, layout: ir.Layout) -> tuple[str, str, int | None, str | None] | None:
    """(message, parameter, dimension or None, hint) for a primitive outside the semantics' domain.

    One home for these rules: the parser points them at the source, maskdsl.lang.validate at the field
    of a Spec built in Python.
    """
    if isinstance(expr, ir.Neighborhood):
        for d, n in enumerate(layout.shape):
            w, dil, s = expr.window[d], expr.dilation[d], expr.stride[d]
            where = f"dimension {d}" if layout.rank > 1 else "the layout"
            if w < 1:
                return f"window {w} must be at least 1", "window", d, None
            if w > n:
                return f"window {w} is larger than the extent {n} of {where}", "window", d, f"use a window of at most {n}"
            if dil < 1:
                return f"dilation {dil} must be at least 1", "dilation", d, None
            if w * dil > n:
                return (f"window {w} x dilation {dil} = {w * dil} is larger than the extent {n} of {where}",
                        "dilation", d, f"use a dilation of at most {n // w} or a window of at most {n // dil}")
            if s < 1 or s > w:
                return (f"stride {s} must be between 1 and the window {w} in {where}", "stride", d,
                        "a stride larger than the window leaves keys unseen")
    elif isinstance(expr, ir.Sink):
        if not 1 <= expr.n <= layout.tokens:
            return f"sink({expr.n}) needs 1 <= n <= {layout.tokens} (the tokens of {layout.name!r})", "n", None, None
    elif isinstance(expr, ir.TopK):
        if expr.k < 1:
            return f"topk k={expr.k} must be at least 1", "k", None, "k is the number of key blocks kept"
        for d, b in enumerate(expr.block):
            if b < 1:
                return (f"topk block={b} must be at least 1", "block", d,
                        "block is the extent of a block per dimension, e.g. 64 or (2, 8, 8)")
    return None
