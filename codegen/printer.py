"""Print maskdsl.intervals' sympy bounds as Triton expressions.

The kernel evaluates the very expressions the simulator counts with. Integer division is
printed through `_fdiv` (floor division that agrees on the GPU, where `//` truncates toward
zero, and in the interpreter, where it floors), because bounds such as `ceil((lo - g) / d)`
can have negative numerators.
"""

from __future__ import annotations

import sympy as sp

from maskdsl.intervals import G, I, N


def to_triton(expr: sp.Expr, names: dict[str, str]) -> str:
    """`names` maps the symbols i, g, n to the Triton variables that hold them."""
    return _print(sp.sympify(expr), names)


def _print(e: sp.Expr, names) -> str:
    if e.is_Integer:
        return str(int(e))
    if e in (I, G, N):
        return names[str(e)]
    if isinstance(e, sp.Min):
        return _fold("tl.minimum", e.args, names)
    if isinstance(e, sp.Max):
        return _fold("tl.maximum", e.args, names)
    if isinstance(e, (sp.floor, sp.ceiling)):
        num, den = sp.fraction(sp.together(e.args[0]))
        if not den.is_Integer or den <= 0:
            raise ValueError(f"cannot print {e}: the denominator must be a positive integer")
        if den == 1:
            return _print(num, names)
        if isinstance(e, sp.floor):
            return f"_fdiv({_print(num, names)}, {int(den)})"
        return f"(-_fdiv(-({_print(num, names)}), {int(den)}))"
    if isinstance(e, sp.Add):
        terms = [_print(a, names) for a in e.args]
        return "(" + " + ".join(terms) + ")"
    if isinstance(e, sp.Mul):
        coeff, rest = e.as_coeff_Mul()
        if coeff.is_Rational and not coeff.is_Integer:
            raise ValueError(f"cannot print {e}: non-integer coefficient")
        factors = [_print(a, names) for a in sp.Mul.make_args(rest)]
        if coeff != 1:
            factors.insert(0, str(int(coeff)))
        return "(" + " * ".join(factors) + ")"
    raise ValueError(f"cannot print {e!r} ({type(e).__name__}) as a Triton expression")


def _fold(fn: str, args, names) -> str:
    out = _print(args[0], names)
    for a in args[1:]:
        out = f"{fn}({out}, {_print(a, names)})"
    return out
