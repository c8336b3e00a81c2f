"""Print maskdsl.analysis.intervals' sympy bounds as Triton source that reads like hand-written code.

The kernel evaluates the very expressions the simulator counts with; printing only changes how
they read, never a value the kernel uses:

* `drop_idle`: a Min/Max argument that never binds on the valid query points
  (`intervals.query_domain`) goes: the clamps to [0, n - 1], `Min(i, n - 1)` of an undilated
  window. Outside those points (rows past the grid's edge) the kernel never reads a bound.
* `assign`: sympy's `cse` names what several bounds share (a window's start is both ends' base).
* identities fold because sympy never writes them (`x // 1`, `+ 0`, `1 * x`).

Integer division is `a // b` where sympy proves `a >= 0` (the GPU's truncation and the
interpreter's flooring then agree), else `_fdiv`, a floor division on both.
"""

from __future__ import annotations

from itertools import count
from collections.abc import Iterable

import numpy as np
import sympy as sp

from maskdsl.analysis.intervals import values

ATOM, UNARY, MUL, ADD, CMP = 4, 3, 2, 1, 0
_RELATIONS = {sp.Le: "<=", sp.Lt: "<", sp.Ge: ">=", sp.Gt: ">", sp.Eq: "=="}


class _WholeDivision(sp.Function):
    """A division by a positive integer b that sympy keeps whole (folded only when both sides are numbers)."""

    is_integer = True

    @classmethod
    def eval(cls, a, b):
        if b == 1:
            return a
        if a.is_Integer and b.is_Integer:
            return sp.Integer(int(a) // int(b))
        return None


class FloorDiv(_WholeDivision):
    """`a // b` for a positive integer b, where the caller knows a >= 0 at every point it uses:
    tile indices of key coordinates. Unlike `floor(a / b)` sympy leaves it whole."""


class Floor(_WholeDivision):
    """floor(a / b) for a positive integer b, kept whole so that `cse` never splits the fraction."""


def whole_divisions(expr: sp.Expr) -> sp.Expr:
    """floor(x / d) and ceiling(x / d) as `Floor` (ceil(a / b) = floor((a + b - 1) / b) for integers)."""
    def convert(e):
        num, den = sp.fraction(sp.together(e.args[0]))
        if not den.is_Integer or den <= 0:
            raise ValueError(f"cannot print {e}: the denominator must be a positive integer")
        num = sp.expand(num)
        return Floor(num if isinstance(e, sp.floor) else num + den - 1, den)

    return expr.replace(lambda e: isinstance(e, (sp.floor, sp.ceiling)), convert)


def symbol(name: str) -> sp.Symbol:
    """A kernel variable that holds a non-negative integer (coordinates, lengths, tile indices)."""
    return sp.Symbol(name, integer=True, nonnegative=True)


def to_triton(expr, names: dict[str, str] | None = None) -> str:
    """One expression as Triton source; `names` renames symbols (by their sympy name)."""
    return _print(whole_divisions(sp.sympify(expr)), names or {})[0]


def drop_idle(expr: sp.Expr, env: dict) -> sp.Expr:
    """`expr` without the Min/Max arguments that never decide its value at the points of `env`.

    Bottom-up and node by node: an argument is dropped when the node keeps every value without it,
    so the whole expression keeps every value too.
    """
    if not expr.args or expr.is_Atom:
        return expr
    args = [drop_idle(a, env) for a in expr.args]
    node = expr.func(*args) if args != list(expr.args) else expr
    if not isinstance(node, (sp.Min, sp.Max)):
        return node
    want = values(node, env)
    kept = list(node.args)
    for a in node.args:
        rest = [x for x in kept if x is not a]
        if rest and np.array_equal(values(node.func(*rest), env), want):
            kept = rest
    return node.func(*kept) if len(kept) != len(node.args) else node


class Temps:
    """Names for common subexpressions, numbered across one kernel (x0, x1, ...)."""

    def __init__(self):
        self._next = count()

    def fresh(self, like: sp.Expr) -> sp.Symbol:
        name = f"x{next(self._next)}"
        return symbol(name) if like.is_nonnegative else sp.Symbol(name, integer=True)


def assign(targets: Iterable[tuple[str | None, sp.Expr]], temps: Temps) -> tuple[list[str], list[str]]:
    """(lines, texts): `name = expr` lines for the named targets, common subexpressions first, and
    the printed text of each target (unnamed ones are conditions the caller prints inside a line).

    A shared subexpression that is itself a named target takes that name: `hi = lo + 14`, not
    `x0 = ...; lo = x0; hi = x0 + 14`.
    """
    targets = list(targets)
    exprs = [whole_divisions(sp.sympify(e)) for _, e in targets]
    repl, reduced = sp.cse(exprs, symbols=sp.numbered_symbols("_cse"))
    rename: dict[sp.Symbol, sp.Symbol] = {}
    named = set()
    for (name, _), r in zip(targets, reduced):
        if name is not None and r in dict(repl) and r not in rename:
            rename[r] = symbol(name) if dict(repl)[r].is_nonnegative else sp.Symbol(name, integer=True)
            named.add(name)
    lines = []
    for sym, sub in repl:
        sub = sub.xreplace(rename)
        new = rename.get(sym) or temps.fresh(sub)
        rename[sym] = new
        lines.append(f"{new.name} = {to_triton(sub)}")
    texts = []
    for (name, _), r in zip(targets, reduced):
        text = to_triton(r.xreplace(rename))
        texts.append(text)
        if name is not None and name not in named:
            lines.append(f"{name} = {text}")
    return lines, texts


def _print(e: sp.Basic, names: dict) -> tuple[str, int]:
    """(text, precedence) of one expression; the caller parenthesizes what binds looser."""
    if e.is_Integer:
        return str(int(e)), ATOM if e >= 0 else UNARY
    if e.is_Symbol:
        return names.get(e.name, e.name), ATOM
    if e is sp.true or e is sp.false:
        return str(bool(e)), ATOM
    if isinstance(e, (sp.Min, sp.Max)):
        fn = "tl.minimum" if isinstance(e, sp.Min) else "tl.maximum"
        args = sorted(e.args, key=lambda a: a.is_number)  # `tl.minimum(x, 15)`: the constant last
        out = _print(args[0], names)[0]
        for a in args[1:]:
            out = f"{fn}({out}, {_print(a, names)[0]})"
        return out, ATOM
    if isinstance(e, FloorDiv):
        return f"{_wrap(e.args[0], names, MUL)} // {_wrap(e.args[1], names, ATOM)}", MUL
    if isinstance(e, Floor):
        num, den = e.args
        if num.is_nonnegative:
            return _print(FloorDiv(num, den), names)
        return f"_fdiv({_print(num, names)[0]}, {int(den)})", ATOM
    if isinstance(e, sp.Mod):
        a, m = e.args
        if not (a.is_nonnegative and m.is_Integer and m > 0):
            raise ValueError(f"cannot print {e}: needs a non-negative dividend and a positive integer modulus")
        return f"{_wrap(a, names, MUL)} % {int(m)}", MUL
    if isinstance(e, sp.Add):
        return _print_add(e, names), ADD
    if isinstance(e, sp.Mul):
        coeff, rest = e.as_coeff_Mul()
        if not coeff.is_Integer:
            raise ValueError(f"cannot print {e}: non-integer coefficient")
        if coeff < 0:
            return "-" + _wrap(-e, names, UNARY), UNARY
        factors = [_wrap(a, names, ATOM) for a in sp.Mul.make_args(rest)]
        if coeff != 1:
            factors.insert(0, str(int(coeff)))
        return " * ".join(factors), MUL
    if type(e) in _RELATIONS:
        return f"{_wrap(e.lhs, names, ADD)} {_RELATIONS[type(e)]} {_wrap(e.rhs, names, ADD)}", CMP
    raise ValueError(f"cannot print {e!r} ({type(e).__name__}) as a Triton expression")


def _wrap(e, names, least: int) -> str:
    text, prec = _print(e, names)
    return text if prec >= least else f"({text})"


def _print_add(e: sp.Add, names) -> str:
    """Variables first, subtractions after, the constant last (`x - 7`, `15 - x` when nothing else is added)."""
    const = sum((a for a in e.args if a.is_number), sp.Integer(0))
    plus = [a for a in e.args if not a.is_number and not a.could_extract_minus_sign()]
    minus = [a for a in e.args if not a.is_number and a.could_extract_minus_sign()]
    if not plus and const > 0:
        parts, const = [str(int(const))], sp.Integer(0)
    else:
        parts = [_wrap(a, names, ADD + 1) for a in plus]
    for a in minus:
        parts.append(("- " if parts else "-") + _wrap(-a, names, ADD + 1))
    if const:
        parts.append(f"+ {int(const)}" if const > 0 else f"- {-int(const)}")
    text = parts[0]
    for p in parts[1:]:
        text += " " + p if p[0] in "+-" and p[1] == " " else " + " + p
    return text
