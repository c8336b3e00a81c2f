"""Spec text -> validated IR (`Spec`). Front of the language: `parse` and `load`.

Statements are resolved in file order, so a mask may only use masks defined above it;
named masks are inlined, which makes the IR self-contained and names irrelevant to hashes.
"""

from __future__ import annotations

import os
from pathlib import Path

from maskdsl.spec import ir, limits
from maskdsl.spec.errors import BindError, SpecError, suggest
from maskdsl.lang.primitives import BARE_PRIMITIVES, PRIMITIVES, Param, bind_args, bind_call
from maskdsl.lang.syntax import BinOp, Call, Ref, Stmt, parse_syntax
from maskdsl.lang.validate import RESERVED, attention_problem, expression_problem

ATTENTION_PARAMS = (Param("mask", "word"), Param("heads", "int"), Param("head_dim", "int", 128),
                    Param("kv_heads", "int", 0), Param("dtype", "word", "bf16"), Param("batch", "int", 1))


def parse(text: str, filename: str = "<string>") -> ir.Spec:
    """Parse and validate a spec; raises SpecError (a ValueError) with file:line:col and a hint."""
    if not isinstance(text, str):
        raise SpecError(f"a spec is text, got {type(text).__name__}", filename=filename, hint="pass a str")
    text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not part of line 1
    try:
        return _Resolver(text, filename).run()
    except BindError as exc:
        line, column = exc.pos
        raise SpecError(exc.message, filename=filename, line=line, column=column, source=text, hint=exc.hint) from None


def load(path) -> ir.Spec:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SpecError(f"cannot read the spec: {exc.strerror}", filename=str(path), line=0, column=0,
                        hint="check the path") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise SpecError(f"the spec is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})",
                        filename=str(path), line=line, column=column, hint="save the file as UTF-8") from None
    return parse(text, filename=str(path))


class _Resolver:
    def __init__(self, text: str, filename: str):
        self.text, self.filename = text, filename
        self.layouts: dict[str, ir.Layout] = {}
        self.masks: dict[str, ir.MaskDef] = {}
        self.attentions: dict[str, ir.Attention] = {}

    def run(self) -> ir.Spec:
        for stmt in parse_syntax(self.text, self.filename):
            self._check_name(stmt)
            if stmt.kind == "layout":
                self.layouts[stmt.name] = self._layout(stmt)
            elif stmt.kind == "mask":
                self.masks[stmt.name] = self._mask(stmt)
            else:
                self.attentions[stmt.name] = self._attention(stmt)
        return ir.Spec(tuple(self.layouts.values()), tuple(self.masks.values()), tuple(self.attentions.values()))

    def _check_name(self, stmt: Stmt) -> None:
        if stmt.name in RESERVED:
            raise BindError(f"{stmt.name!r} is a reserved word and cannot name a {stmt.kind}", stmt.name_pos,
                            "pick another name")
        table = {"layout": self.layouts, "mask": self.masks, "attention": self.attentions}[stmt.kind]
        if stmt.name in table:
            raise BindError(f"duplicate {stmt.kind} name {stmt.name!r}", stmt.name_pos,
                            f"each {stmt.kind} needs its own name")

    def _layout(self, stmt: Stmt) -> ir.Layout:
        call = stmt.body
        if not isinstance(call, Call) or call.name != "grid":
            pos = call.pos if isinstance(call, (Call, Ref)) else stmt.pos
            name = getattr(call, "name", "?")
            raise BindError(f"a layout is a grid, not {name!r}", pos, "write layout NAME = grid(n0[, n1[, n2]])")
        if not 1 <= len(call.args) <= 3 or any(a.key is not None for a in call.args):
            raise BindError(f"grid takes 1 to 3 positional extents, got {len(call.args)} argument(s)", call.pos,
                            "write grid(4096), grid(128, 128) or grid(30, 48, 80)")
        shape = []
        for arg in call.args:
            v = arg.value
            if v.kind != "int":
                raise BindError(f"a grid extent must be an integer, got {v.describe()}", v.pos)
            if v.value < 1:
                raise BindError(f"grid extent {v.value} must be positive", v.pos)
            shape.append(v.value)
        problem = limits.shape_problem(tuple(shape))
        if problem is not None:
            message, dim, hint = problem
            raise BindError(message, call.pos if dim is None else call.args[dim].value.pos, hint)
        return ir.Layout(stmt.name, tuple(shape))

    def _mask(self, stmt: Stmt) -> ir.MaskDef:
        layout = self._mask_layout(stmt)
        expr = self._expr(stmt.body, layout)
        problem = expression_problem(expr)  # on the inlined form, which is what `fmt` prints and later stages walk
        if problem is not None:
            raise BindError(f"mask {stmt.name!r}: {problem[0]}", stmt.name_pos, problem[1])
        if ir.has_documents(expr):  # its shape comes with each call: the document form is its analysis
            from maskdsl.spec.documents import DocumentProblem, document_form

            try:
                document_form(expr, layout.shape)
            except DocumentProblem as exc:
                raise BindError(f"mask {stmt.name!r}: {exc}", _culprit(stmt.body, exc.primitive) or stmt.name_pos,
                                exc.hint) from None
            return ir.MaskDef(stmt.name, expr, layout)
        from maskdsl.analysis.counts import NotAnalyzable, check_analyzable  # numpy and sympy: only once a mask is read

        try:  # refused here, so that everything that parses can be analysed
            check_analyzable(expr, layout.shape)
        except NotAnalyzable as exc:
            raise BindError(f"mask {stmt.name!r}: {exc}", stmt.name_pos, exc.hint or
                            "split the mask, or combine fewer terms; docs/LIMITS.md lists what is accepted") from None
        return ir.MaskDef(stmt.name, expr, layout)

    def _mask_layout(self, stmt: Stmt) -> ir.Layout:
        if stmt.on is not None:
            if stmt.on.name not in self.layouts:
                raise BindError(f"unknown layout {stmt.on.name!r}{suggest(stmt.on.name, self.layouts)}", stmt.on.pos,
                                f"layouts defined so far: {', '.join(self.layouts) or 'none'}")
            return self.layouts[stmt.on.name]
        used = [r for r in _refs(stmt.body) if r.name in self.masks]
        if used:
            return self.masks[used[0].name].layout
        if len(self.layouts) == 1:
            return next(iter(self.layouts.values()))
        if not self.layouts:
            raise BindError(f"mask {stmt.name!r} needs a layout, and none is defined", stmt.name_pos,
                            "add `layout NAME = grid(...)` above it")
        raise BindError(f"mask {stmt.name!r} does not say which layout it is on", stmt.name_pos,
                        f"add `on LAYOUT` with one of: {', '.join(self.layouts)}")

    def _expr(self, node, layout: ir.Layout) -> ir.MaskExpr:
        if isinstance(node, BinOp):
            left, right = self._expr(node.left, layout), self._expr(node.right, layout)
            return ir.union(left, right) if node.op == "|" else ir.intersection(left, right)
        if isinstance(node, Call):
            return bind_call(node, layout)
        if node.name in self.masks:
            used = self.masks[node.name]
            if used.layout.shape != layout.shape:
                raise BindError(f"mask {node.name!r} is on {used.layout.name!r} {used.layout.shape}, but this mask "
                                f"is on {layout.name!r} {layout.shape}", node.pos,
                                "masks can only be combined over layouts of the same size")
            return used.expr
        if node.name in BARE_PRIMITIVES:
            return bind_call(Call(node.name, (), node.pos), layout)
        if node.name in PRIMITIVES:
            raise BindError(f"{node.name} needs arguments", node.pos, f"write {node.name}(...)")
        known = list(self.masks) + list(BARE_PRIMITIVES)
        raise BindError(f"unknown mask {node.name!r}{suggest(node.name, known)}", node.pos,
                        f"masks defined so far: {', '.join(self.masks) or 'none'}; a mask must be defined before use")

    def _attention(self, stmt: Stmt) -> ir.Attention:
        call = Call("attention", stmt.body, stmt.name_pos)
        values = bind_args(call, ATTENTION_PARAMS, f"attention {stmt.name}")
        out = {}
        for p in ATTENTION_PARAMS:
            v = values[p.name]
            if p.kind == "int" and v.kind != "int":
                raise BindError(f"{p.name} must be an integer, got {v.describe()}", v.pos)
            if p.kind == "word" and v.kind != "word":
                raise BindError(f"{p.name} must be a name, got {v.describe()}", v.pos)
            out[p.name] = v.value
        if out["mask"] not in self.masks:
            raise BindError(f"unknown mask {out['mask']!r}{suggest(out['mask'], self.masks)}", values["mask"].pos,
                            f"masks defined so far: {', '.join(self.masks) or 'none'}")
        problem = attention_problem(out)
        if problem is not None:
            message, key, hint = problem
            if key == "dtype":
                message += suggest(out["dtype"], ir.SPEC_DTYPES)
            raise BindError(message, values[key].pos, hint)
        kv = out["kv_heads"] or out["heads"]
        return ir.Attention(stmt.name, out["mask"], out["heads"], kv, out["head_dim"], out["dtype"], out["batch"])


def as_spec(spec) -> ir.Spec:
    """A Spec as given, or the one a .mask file at this path holds: every entry point that takes either."""
    if isinstance(spec, ir.Spec):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        return load(spec)
    raise ValueError(f"spec must be a maskdsl Spec or a path to a .mask file, got {type(spec).__name__}")


# The keywords a user may have written for the primitive a document problem names.
_SPELLINGS = {"neighborhood": ("dilated", "neighborhood"), "strided": ("strided", "block", "neighborhood"),
              "sliding_window": ("sliding_window", "neighborhood")}


def _culprit(node, primitive: str):
    """The position of the first call or bare word spelling `primitive` in a mask's syntax, else None."""
    names = _SPELLINGS.get(primitive, (primitive,))
    for name in names:
        stack = [node]
        while stack:
            n = stack.pop()
            if isinstance(n, BinOp):
                stack.extend((n.right, n.left))
            elif isinstance(n, (Call, Ref)) and n.name == name:
                return n.pos
    return None


def _refs(node):
    if isinstance(node, BinOp):
        yield from _refs(node.left)
        yield from _refs(node.right)
    elif isinstance(node, Ref):
        yield node
