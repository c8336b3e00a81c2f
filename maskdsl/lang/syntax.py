"""Text -> a small positioned syntax tree, with lark's errors turned into SpecErrors.

The syntax tree keeps a (line, column) on every value so that validation, which runs
later on the typed IR's inputs, can point at the exact offending token.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import lark

from maskdsl.spec.errors import BindError, SpecError
from maskdsl.spec.limits import MAX_DEPTH, MAX_INT

Pos = tuple[int, int]


@dataclass(frozen=True)
class Value:
    kind: str  # "int" | "bool" | "word" | "tuple"
    value: object  # int, bool, str, or tuple[Value, ...]
    pos: Pos

    def describe(self) -> str:
        if self.kind == "tuple":
            return "(" + ", ".join(v.describe() for v in self.value) + ")"
        if self.kind == "bool":
            return "true" if self.value else "false"
        return str(self.value)


@dataclass(frozen=True)
class Arg:
    key: str | None
    value: Value
    pos: Pos


@dataclass(frozen=True)
class Call:
    name: str
    args: tuple[Arg, ...]
    pos: Pos


@dataclass(frozen=True)
class Ref:
    name: str
    pos: Pos


@dataclass(frozen=True)
class BinOp:
    op: str  # "|" or "&"
    left: object
    right: object
    pos: Pos


@dataclass(frozen=True)
class Stmt:
    kind: str  # "layout" | "mask" | "attention"
    name: str
    name_pos: Pos
    body: object  # Call for layout, expression for mask, tuple[Arg] for attention
    on: Ref | None
    pos: Pos


_TOKEN_NAMES = {
    "LPAR": "'('", "RPAR": "')'", "COMMA": "','", "EQUAL": "'='", "VBAR": "'|'", "AMPERSAND": "'&'",
    "INT": "an integer", "NAME": "a name", "LAYOUT": "'layout'", "MASK": "'mask'", "ON": "'on'",
    "ATTENTION": "'attention'", "TRUE": "'true'", "FALSE": "'false'", "$END": "end of file",
}


@lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    grammar = (Path(__file__).parent / "grammar.lark").read_text()
    return lark.Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=False)


def parse_syntax(text: str, filename: str) -> list[Stmt]:
    try:
        tree = _parser().parse(text)
    except lark.exceptions.UnexpectedInput as exc:
        raise _syntax_error(exc, text, filename) from None
    for child in tree.children:
        _check_depth(child)
    return [_stmt(child) for child in tree.children]


def _check_depth(stmt: lark.Tree) -> None:
    """Refuse expressions nested deeper than MAX_DEPTH before anything walks them recursively.

    (A chain of a thousand `|` is a thousand levels deep: the conversion below, and every later
    walk of the IR, would hit Python's recursion limit.) The walk here keeps its own stack.
    Parenthesised values (`grid(((4)))`, tuples of tuples) nest the same way and are bounded alike.
    """
    stack = [(stmt, 0, 0)]
    while stack:
        node, level, parens = stack.pop()
        if node.data in ("union", "intersection"):
            level += 1
            if level > MAX_DEPTH:
                raise BindError(f"the mask expression nests more than {MAX_DEPTH} levels of `|`/`&`", _pos(node),
                                "name parts of it with their own `mask` statements")
        elif node.data == "tuple":
            parens += 1
            if parens > MAX_DEPTH:
                raise BindError(f"a value nests more than {MAX_DEPTH} levels of parentheses", _pos(node),
                                "a value is a number, a name, or one flat tuple like (3, 3)")
        stack.extend((c, level, parens) for c in node.children if isinstance(c, lark.Tree))


def _syntax_error(exc: lark.exceptions.UnexpectedInput, text: str, filename: str) -> SpecError:
    line, column = getattr(exc, "line", 0) or 0, getattr(exc, "column", 0) or 0
    expected = sorted({_TOKEN_NAMES.get(t, t) for t in (getattr(exc, "expected", None) or getattr(exc, "allowed", None) or ())})
    if isinstance(exc, lark.exceptions.UnexpectedCharacters):
        char = text[exc.pos_in_stream] if exc.pos_in_stream < len(text) else "?"
        message = f"unexpected character {char!r}"
    elif isinstance(exc, lark.exceptions.UnexpectedToken) and exc.token.type == "$END":
        message = "unexpected end of file"
        lines = text.splitlines() or [""]
        line, column = len(lines), len(lines[-1]) + 1
    else:
        message = f"unexpected {exc.token.value!r}"
    if expected:
        message += f"; expected {', '.join(expected[:8])}"
    hint = ("statements are `layout NAME = grid(...)`, `mask NAME = EXPR [on LAYOUT]` and "
            "`attention NAME(mask=..., heads=..., head_dim=...)`; masks combine with `|` and `&`")
    return SpecError(message, filename=filename, line=line, column=column, source=text, hint=hint)


def _pos(node) -> Pos:
    if isinstance(node, lark.Token):
        return (node.line, node.column)
    return (node.meta.line, node.meta.column)


def _stmt(tree: lark.Tree) -> Stmt:
    name_tok = tree.children[0]
    kind = tree.data.removesuffix("_stmt")
    on = None
    if kind == "layout":
        body = _expr(tree.children[1])
    elif kind == "mask":
        body = _expr(tree.children[1])
        if len(tree.children) > 2:
            on_tok = tree.children[2].children[0]
            on = Ref(str(on_tok), _pos(on_tok))
    else:
        body = _arglist(tree.children[1]) if len(tree.children) > 1 else ()
    return Stmt(kind, str(name_tok), _pos(name_tok), body, on, _pos(tree))


def _expr(tree):
    if tree.data == "call":
        name_tok = tree.children[0]
        args = _arglist(tree.children[1]) if len(tree.children) > 1 else ()
        return Call(str(name_tok), args, _pos(name_tok))
    if tree.data == "ref":
        tok = tree.children[0]
        return Ref(str(tok), _pos(tok))
    op = "|" if tree.data == "union" else "&"
    return BinOp(op, _expr(tree.children[0]), _expr(tree.children[1]), _pos(tree))


def _arglist(tree) -> tuple[Arg, ...]:
    args = []
    for arg in tree.children:
        if arg.data == "kwarg":
            key_tok, value = arg.children
            args.append(Arg(str(key_tok), _value(value), _pos(key_tok)))
        else:
            value = _value(arg.children[0])
            args.append(Arg(None, value, value.pos))
    return tuple(args)


def _value(tree) -> Value:
    kind = tree.data
    if kind == "int":
        token = tree.children[0]
        digits = str(token).lstrip("-").lstrip("0")
        # Length first: int() of a 5,000-digit literal raises Python's own digit-limit ValueError.
        if len(digits) > len(str(MAX_INT)) or abs(int(token)) > MAX_INT:
            raise BindError(f"integer {str(token)[:24]}{'...' if len(token) > 24 else ''} is too large",
                            _pos(token), f"integers in a spec are at most {MAX_INT} (2^63 - 1)")
        return Value("int", int(token), _pos(token))
    if kind in ("true", "false"):
        return Value("bool", kind == "true", _pos(tree.children[0]))
    if kind == "word":
        return Value("word", str(tree.children[0]), _pos(tree.children[0]))
    items = tuple(_value(c) for c in tree.children)
    return Value("tuple", items, _pos(tree))
