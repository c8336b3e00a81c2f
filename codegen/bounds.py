"""The key bounds a kernel prints, per product term and dimension, from the analysis' expressions.

For term label L (`0`, `1`, ... in the static kernel; `s0`, `r0`, ... in the top-k one) and
dimension d, the kernel holds:

* `lo_L_d`, `hi_L_d`: each query row's first and last key (the predicate of partial tiles);
* `kt_lo_L_d`, `kt_hi_L_d`: the key tiles the query tile visits, and `full_lo_L_d`, `full_hi_L_d`
  those every row of it sees entirely (only where a plan runs full tiles without a predicate);
* `active_L` (the term reaches a key from this query tile) and `full_L` (it has full tiles). An
  inactive term's dimension-0 range is emptied (`kt_hi = kt_lo - 1`), so every box built from it is
  empty and no tile is inside it; likewise the full range when `full_L` is false.

Coordinates are the layout's: in a dimension the layout permutes by dilation d
(`maskdsl.analysis.counts.layout_dilation`), group coordinates of the query's group. A term with another
dilation there ("strided": the layout then keeps the dimension undilated) is printed in the
dimension's own coordinates: its rows' keys are the ones in [lo, hi] in phase with lo, its visited
range is the min/max over the tile's rows, and it has no full tiles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from maskdsl.codegen.plan import DimPlan, TermDim
from maskdsl.codegen.printer import FloorDiv, Temps, assign, drop_idle, symbol, to_triton
from maskdsl.analysis.intervals import G, I, N, query_domain, values


@dataclass(frozen=True)
class KernelDim:
    """One grid dimension as the kernel sees it: the plan's facts and the names of its variables."""

    i: int
    plan: DimPlan
    q_inner: int  # query rows per step of this dimension inside a query tile (row-major)
    kv_inner: int

    @property
    def group_len_const(self) -> int | None:
        """The length every dilation group has, when they all have one (d divides n)."""
        p = self.plan
        return p.extent // p.dilation if p.extent % p.dilation == 0 else None

    @property
    def g(self) -> sp.Expr:
        return symbol(f"g_{self.i}") if self.plan.dilation > 1 else sp.Integer(0)

    @property
    def n(self) -> sp.Expr:
        const = self.group_len_const
        return sp.Integer(const) if const is not None else symbol(f"n_{self.i}")

    @property
    def ragged_q(self) -> bool:
        """Some query tile of this dimension runs past its group's end."""
        return any(((self.plan.extent - g + self.plan.dilation - 1) // self.plan.dilation) % self.plan.q_tile
                   for g in range(self.plan.dilation))

    @property
    def ragged_kv(self) -> bool:
        return any(((self.plan.extent - g + self.plan.dilation - 1) // self.plan.dilation) % self.plan.kv_tile
                   for g in range(self.plan.dilation))

    def coordinate(self, name: str) -> str:
        """The original coordinate of group coordinate `name` (`g + d * name`), folded."""
        d = self.plan.dilation
        return name if d == 1 else f"(g_{self.i} + {d} * {name})"


@dataclass
class TermText:
    """What the kernel prints for one term: lines for the rows' bounds, for its tile ranges, its flags."""

    label: str
    rows: list[str] = field(default_factory=list)
    tiles: list[str] = field(default_factory=list)
    phases: list[int | None] = field(default_factory=list)  # per dimension: a strided term's dilation


def term_text(label: str, term: tuple[TermDim, ...], dims: list[KernelDim], temps: Temps, full: bool) -> TermText:
    out = TermText(label)
    active, full_ok = [], []
    for td, dim in zip(term, dims):
        s = f"{label}_{dim.i}"
        if td.dilation == dim.plan.dilation:
            _aligned(out, s, td, dim, temps, full, active, full_ok)
            out.phases.append(None)
        else:
            if full:
                raise AssertionError("a strided term has no full tiles (KernelPlan.full_box)")
            _strided(out, s, td, dim, temps, active)
            out.phases.append(td.dilation)
    first = f"{label}_{dims[0].i}"
    if active:
        out.tiles.append(f"active_{label} = {_conj(active)}")
        out.tiles.append(f"kt_hi_{first} = tl.where(active_{label}, kt_hi_{first}, kt_lo_{first} - 1)")
    if full:
        flags = ([f"active_{label}"] if active else []) + full_ok
        flags += [f"full_lo_{label}_{d.i} <= full_hi_{label}_{d.i}" for d in dims]
        out.tiles.append(f"full_{label} = {_conj(flags)}")
        out.tiles.append(f"full_lo_{first} = tl.where(full_{label}, full_lo_{first}, kt_hi_{first} + 1)")
        out.tiles.append(f"full_hi_{first} = tl.where(full_{label}, full_hi_{first}, kt_hi_{first})")
    return out


def _conj(conds: list[str]) -> str:
    return conds[0] if len(conds) == 1 else " & ".join(f"({c})" for c in conds)


def _layout_bounds(td: TermDim, dilation: int, extent: int, n: sp.Expr, g: sp.Expr):
    """lo, hi on the term's own group coordinates, clamped to [0, n - 1] where they can leave it,
    with every Min/Max argument that never binds on the valid rows dropped, and G, N folded."""
    env = query_domain(dilation, extent)
    lo, hi = sp.sympify(td.lo), sp.sympify(td.hi)
    if values(lo, env).min() < 0:
        lo = sp.Max(lo, 0)
    if (values(hi, env) > env[N] - 1).any():
        hi = sp.Min(hi, N - 1)
    constant = {s: v for s, v in ((G, g), (N, n)) if v.is_Integer}
    lo = drop_idle(lo.subs(constant, simultaneous=True), env)
    hi = drop_idle(hi.subs(constant, simultaneous=True), env)
    empty_rows = bool((values(lo, env) > values(hi, env)).any())
    named = {s: v for s, v in ((G, g), (N, n)) if not v.is_Integer}
    return lo.subs(named, simultaneous=True), hi.subs(named, simultaneous=True), empty_rows


def row_bounds(label: str, term: tuple[TermDim, ...], dims: list[KernelDim], temps: Temps) -> list[str]:
    """The lines setting `lo_L_d`, `hi_L_d`, each row's first and last key, from the rows' coordinates
    `rows_d`: what a partial tile's predicate reads (the forward's query rows, or the rows of the query
    tile a backward kernel visits)."""
    out = []
    for td, dim in zip(term, dims):
        s = f"{label}_{dim.i}"
        out += _aligned_rows(s, td, dim, temps)[0] if td.dilation == dim.plan.dilation else _strided_rows(s, td, dim, temps)
    return out


def _aligned_rows(s: str, td: TermDim, dim: KernelDim, temps) -> tuple[list[str], sp.Expr, sp.Expr, bool]:
    lo, hi, empty_rows = _layout_bounds(td, dim.plan.dilation, dim.plan.extent, dim.n, dim.g)
    rows = symbol(f"rows_{dim.i}")
    lines, _ = assign([(f"lo_{s}", lo.subs(I, rows)), (f"hi_{s}", _opaque_hi(lo, hi, dim.n).subs(I, rows))], temps)
    if td.restricts_queries:
        coord = dim.g + dim.plan.dilation * rows
        inside = [c for c in (sp.Ge(coord, td.qa), sp.Lt(coord, td.qb)) if c is not sp.true]
        lines.append(f"hi_{s} = tl.where({_conj([to_triton(c) for c in inside])}, hi_{s}, -1)")
    return lines, lo, hi, empty_rows


def _aligned(out: TermText, s: str, td: TermDim, dim: KernelDim, temps, full: bool, active, full_ok) -> None:
    d, T = dim.plan.dilation, dim.plan.kv_tile
    lines, lo, hi, empty_rows = _aligned_rows(s, td, dim, temps)
    out.rows += lines
    first, last = symbol(f"first_{dim.i}"), symbol(f"last_{dim.i}")
    if td.restricts_queries:
        qfirst, qlast = symbol(f"qfirst_{s}"), symbol(f"qlast_{s}")
        bounds = [(qfirst.name, sp.Max(first, sp.ceiling((td.qa - dim.g) / d))),
                  (qlast.name, sp.Min(last, sp.floor((td.qb - 1 - dim.g) / d)))]
        lines, _ = assign(bounds, temps)
        out.tiles += lines
        active.append(f"{qfirst.name} <= {qlast.name}")
        full_ok += [f"{qfirst.name} == {first.name}", f"{qlast.name} == {last.name}"]
        first, last = qfirst, qlast
    klo, khi = lo.subs(I, first), hi.subs(I, last)
    targets = [(f"kt_lo_{s}", FloorDiv(klo, T)), (f"kt_hi_{s}", FloorDiv(khi, T))]
    if full:
        targets += [(f"full_lo_{s}", FloorDiv(lo.subs(I, last) + T - 1, T)),
                    (f"full_hi_{s}", FloorDiv(hi.subs(I, first) + 1, T) - 1)]
    if empty_rows:  # else every row sees a key: lo(first) <= hi(first) <= hi(last)
        targets.append((None, sp.Le(klo, khi)))
    lines, texts = assign(targets, temps)
    out.tiles += lines
    if empty_rows and texts[-1] != "True":
        active.append(texts[-1])


def _strided(out: TermText, s: str, td: TermDim, dim: KernelDim, temps, active) -> None:
    """A term of dilation e in an undilated dimension: row c is in group c % e at group coordinate c // e."""
    extent, T = dim.plan.extent, dim.plan.kv_tile
    out.rows += _strided_rows(s, td, dim, temps)
    seen = f"lo_{s} <= hi_{s}"
    if dim.ragged_q:
        seen = f"(rows_{dim.i} < {extent}) & ({seen})"
    out.tiles += [f"first_key_{s} = tl.min(tl.where({seen}, lo_{s}, {extent}), 0)",
                  f"last_key_{s} = tl.max(tl.where({seen}, hi_{s}, -1), 0)",
                  f"kt_lo_{s} = {_div(f'first_key_{s}', T)}",
                  f"kt_hi_{s} = {_div(f'last_key_{s}', T)}"]
    active.append(f"first_key_{s} <= last_key_{s}")


def _strided_rows(s: str, td: TermDim, dim: KernelDim, temps) -> list[str]:
    rows = symbol(f"rows_{dim.i}")
    lo, hi = strided_bounds(td, dim.plan.extent, rows)
    lines, _ = assign([(f"lo_{s}", lo), (f"hi_{s}", hi)], temps)
    if td.restricts_queries:
        inside = [c for c in (sp.Ge(rows, td.qa), sp.Lt(rows, td.qb)) if c is not sp.true]
        lines.append(f"hi_{s} = tl.where({_conj([to_triton(c) for c in inside])}, hi_{s}, -1)")
    return lines


def strided_bounds(td: TermDim, extent: int, rows: sp.Symbol) -> tuple[sp.Expr, sp.Expr]:
    """A strided term's first and last key of row `rows`, in the dimension's own coordinates (the
    keys between them are those in phase with the row: `(key - lo) % dilation == 0`)."""
    e = td.dilation
    n = sp.Integer(extent // e) if extent % e == 0 else N
    lo, hi, _ = _layout_bounds(td, e, extent, n, G)
    phase = sp.Mod(rows, e)
    own = {I: sp.floor(rows / e), G: phase, N: sp.floor((extent - phase + e - 1) / e)}
    hi = _opaque_hi(lo, hi, n)
    return phase + e * lo.subs(own, simultaneous=True), phase + e * hi.subs(own, simultaneous=True)


def _opaque_hi(lo: sp.Expr, hi: sp.Expr, n: sp.Expr) -> sp.Expr:
    """hi, clamped to the group's last key even where that never binds, when it is lo + a constant.

    Given `kc >= lo & kc <= lo + w`, LLVM fuses the two compares into one unsigned range check, and
    on sm_90 ptxas then selects each score through three predicates instead of two (+32 FSEL per
    partial tile, 5624 vs 5400 SASS instructions for the default 3-D kernel). The idle clamp keeps
    the bounds opaque to it, as they were when every bound was clamped.
    """
    if (hi - lo).is_Integer:
        return sp.Min(hi, n - 1)
    return hi


def _div(name: str, T: int) -> str:
    return name if T == 1 else f"{name} // {T}"
