"""What the backward template is rendered with: its index arithmetic, printed the forward's way.

The dimension-generic lines (a program's tile, its rows or keys, the rows' key bounds, the
predicate, the walk's tile ranges) are built here from the forward's pieces (codegen.context,
codegen.bounds), so identities fold as they do there: an undilated dimension has no group g_d,
a group length that is the same for every group is a number, a tile that divides its dimension
needs no bounds check, a tile extent of 1 no division or product. The template lays them out.

The walks read the per-dimension range tables (codegen.backward.schedule_tables) by the column
names of maskdsl.analysis.tile_table, the contract the forward's Gluon tables use too; the kernel module
holds those names as constants.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

from maskdsl.analysis import tile_table
from maskdsl.codegen.bounds import KernelDim, row_bounds
from maskdsl.codegen.context import _flat, _lane, _mul, all_of, join, kernel_dims, minus_box
from maskdsl.codegen.plan import KernelPlan
from maskdsl.codegen.printer import Temps, to_triton
from maskdsl.codegen.render import comment_safe

# the range table's columns as the kernel module names them (module-level constexprs)
COLUMNS = {"A": tile_table.A, "B": tile_table.B, "FA": tile_table.FA, "FB": tile_table.FB,
           "RANGE": tile_table.RANGE}


def kv_tiles_per_group(dim) -> int:
    return -(-dim.group_len_max // dim.kv_tile)


def strided(plan: KernelPlan, term, d: int) -> bool:
    """A term whose dilation in dimension d is not the layout's (which then is 1): codegen.bounds' "strided"."""
    return term[d].dilation != plan.dims[d].dilation


def _div(name: str, T: int) -> str:
    if T == 1:
        return name
    return f"({name}) // {T}" if " " in name else f"{name} // {T}"


def _valid(coord: str, dims: list[KernelDim], ragged) -> str:
    """`coord_d < n_d` over the dimensions where a tile can run past its group's end ("" where none can)."""
    return all_of([f"{coord}_{d.i} < {to_triton(d.n)}" for d in dims if ragged(d)]) if any(map(ragged, dims)) else ""


def own_tile(dims: list[KernelDim], tiles, per_group, tile, first: str) -> list[str]:
    """Decode the program's tile: per dimension its index `tix_d` (the table's row), group g_d and
    group length n_d where dilated, and its first coordinate `first_d`. Dimension 0 is the slowest
    and takes what is left (a program's tile is below the tile count)."""
    rank = len(dims)
    lines = ["tile = tl.program_id(0) + tile0  # a segment's tiles are one run from tile0"]
    for d in reversed(dims):
        p = d.plan
        lines.append(f"tix_{d.i} = tile" if d.i == 0 else f"tix_{d.i} = tile % {tiles(d)}")
        pos = f"tix_{d.i}"
        if p.dilation > 1:
            lines.append(f"g_{d.i} = tix_{d.i} // {per_group(d)}")
            if d.group_len_const is None:
                lines.append(f"n_{d.i} = ({p.extent} - g_{d.i} + {p.dilation - 1}) // {p.dilation}")
            pos = f"(tix_{d.i} % {per_group(d)})"
        lines.append(f"{first}_{d.i} = {_mul(pos, tile(d))}")
        if d.i > 0:
            lines.append(f"tile //= {tiles(d)}")
    if rank == 1:  # one dimension: the tile is its index
        lines = [lines[0].replace("tile =", "tix_0 =", 1)] + [ln for ln in lines[1:] if ln != "tix_0 = tile"]
    return lines


def _keep(terms, dims: list[KernelDim], transposed: bool, valid: str, indent: int) -> list[str]:
    """`keep = ...`: the union over terms of "inside the rows' key bounds in every dimension" (and in
    phase, for a strided term), [rows, keys], or [keys, rows] in the dK/dV kernel."""
    parts = []
    for t in terms:
        conds = []
        for d, phase in zip(dims, t["phases"]):
            lo, hi = f"lo_{t['i']}_{d.i}", f"hi_{t['i']}_{d.i}"
            if transposed:
                conds.append(f"_between_keys(kc_{d.i}, {lo}, {hi})")
                if phase:
                    conds.append(f"((kc_{d.i}[:, None] - {lo}[None, :]) % {phase} == 0)")
            else:
                conds.append(f"_between(kc_{d.i}, {lo}, {hi})")
                if phase:
                    conds.append(f"((kc_{d.i}[None, :] - {lo}[:, None]) % {phase} == 0)")
        parts.append(" & ".join(conds))
    if len(parts) > 1:
        parts = [f"({p})" for p in parts]
    lines = join("keep = ", parts, " | ", indent)
    if valid:  # keys past the grid's edge: the forward's way, one more line
        lines.append(f"keep = keep & key_valid{'[:, None]' if transposed else '[None, :]'}")
    return lines


def _ranges(dims: list[KernelDim], terms, maxt: int, walk_tile: int, frame0: str, frame1: str,
            full_box: bool, shell_free: bool) -> list[str]:
    """The tile ranges the program walks, from its rows of the range table: per term and dimension
    the other kind's tiles it visits [a, b] (nb of them) and, for term 0, those it sees whole [fa, fb]."""
    rank = len(dims)
    lines = [f"# per term and dimension: the other tiles this tile visits [a, b] and the fully seen ones [fa, fb],",
             f"# columns A, B, FA, FB of its rows of TBL; along dimension 0 a segment walks only the tiles of",
             f"# frames [{frame0}, {frame1}) (codegen.segment)",
             f"walk_first = {_div(frame0, walk_tile)}",
             f"walk_last = {_div(f'{frame1} + {walk_tile - 1}' if walk_tile > 1 else frame1, walk_tile)} - 1"]
    for t in terms:
        full = t["i"] == 0 and full_box
        for d in dims:
            sfx = f"{t['i']}_{d.i}"
            offset = (t["i"] * rank + d.i) * maxt
            lines.append(f"tb = TBL + {f'({offset} + tix_{d.i})' if offset else f'tix_{d.i}'} * RANGE")
            lines += [f"a_{sfx} = tl.load(tb + A)", f"b_{sfx} = tl.load(tb + B)"]
            if full:
                lines += [f"fa_{sfx} = tl.load(tb + FA)", f"fb_{sfx} = tl.load(tb + FB)"]
            if d.i == 0:
                lines += [f"a_{sfx} = tl.maximum(a_{sfx}, walk_first)", f"b_{sfx} = tl.minimum(b_{sfx}, walk_last)"]
                if full:
                    lines += ["# the full range is clamped into the clamped range: full box and slabs still partition it",
                              f"fa_{sfx} = tl.maximum(a_{sfx}, tl.minimum(fa_{sfx}, b_{sfx} + 1))",
                              f"fb_{sfx} = tl.minimum(b_{sfx}, tl.maximum(fb_{sfx}, a_{sfx} - 1))"]
        i = t["i"]
        lines.append(f"active_{i} = {all_of([f'a_{i}_{d.i} <= b_{i}_{d.i}' for d in dims])}")
        if full:
            lines.append("full_ok_0 = active_0 & " + " & ".join(f"(fa_0_{d.i} <= fb_0_{d.i})" for d in dims))
        lines += [f"nb_{t['i']}_{d.i} = tl.where(active_{t['i']}, b_{t['i']}_{d.i} - a_{t['i']}_{d.i} + 1, 0)"
                  for d in dims]
    if full_box:
        lines += ["# Term 0 (the only one, or a union's dominant one): its fully-seen box runs with no mask",
                  "# arithmetic; the shell around it is cut into 2 x rank slabs that evaluate the predicate."]
        lines += [f"nf_{d.i} = tl.where(full_ok_0, fb_0_{d.i} - fa_0_{d.i} + 1, 0)" for d in dims]
        if not shell_free:
            lines += ['# with nothing fully seen, slab "left of dimension 0" covers the whole box',
                      "fa_0_0 = tl.where(full_ok_0, fa_0_0, a_0_0 + nb_0_0)",
                      "fb_0_0 = tl.where(full_ok_0, fb_0_0, a_0_0 + nb_0_0 - 1)"]
    for t in terms[1:]:
        if t["i"] == 1:
            lines += [f"e_0_{d.i} = a_0_{d.i} + nb_0_{d.i} - 1" for d in dims]
        lines.append(f"# term {t['i']}: what its box holds outside term 0's, per dimension")
        lines += [f"e_{t['i']}_{d.i} = a_{t['i']}_{d.i} + nb_{t['i']}_{d.i} - 1" for d in dims]
        lines += t["minus_lines"]
    return lines


def _schedule_boxes(rank: int, full_box: bool, shell_free: bool) -> tuple[dict | None, list[dict]]:
    """(the full box, the partial boxes) of term 0, as origin and size per dimension: the fully-seen
    box and the 2 x rank slabs around it, or term 0's whole box where a strided term has no full pairs."""
    if not full_box:
        return None, [{"name": "term 0: its box of tiles (a strided term has no fully-seen pairs)",
                       "origin": [f"a_0_{k}" for k in range(rank)], "size": [f"nb_0_{k}" for k in range(rank)]}]
    full = {"name": "full pairs", "origin": [f"fa_0_{k}" for k in range(rank)], "size": [f"nf_{k}" for k in range(rank)]}
    if shell_free:
        return full, []
    slabs = []
    for d in range(rank):
        for side in ("left", "right"):
            origin, size = [], []
            for k in range(rank):
                if k < d:
                    origin.append(f"fa_0_{k}")
                    size.append(f"nf_{k}")
                elif k > d:
                    origin.append(f"a_0_{k}")
                    size.append(f"nb_0_{k}")
                elif side == "left":
                    origin.append(f"a_0_{k}")
                    size.append(f"(fa_0_{k} - a_0_{k})")
                else:
                    origin.append(f"fb_0_{k} + 1")
                    size.append(f"(a_0_{k} + nb_0_{k} - 1 - fb_0_{k})")
            slabs.append({"name": f"partial tiles, {side} of the full box in dimension {d}",
                          "origin": origin, "size": size})
    return full, slabs


def _outside_dominant(t: int, rank: int) -> tuple[list[str], list[dict]]:
    """(lines, pieces): term t's box of tiles minus term 0's, as at most 2 x rank boxes (origin and
    size per dimension), the forward's `minus_box` on the table's [a, a + nb) ranges."""
    dims = [SimpleNamespace(i=d) for d in range(rank)]
    lines, boxes = minus_box(dims, str(t), "a", "e", "0")
    size_of = {}
    for d in range(rank):
        x = f"{t}_{d}"
        size_of[(f"a_{x}", f"e_{x}")] = f"nb_{x}"
        ranges = [(f"a_{x}", f"left_hi_{x}", f"left_n_{x}"), (f"right_lo_{x}", f"e_{x}", f"right_n_{x}")]
        if d < rank - 1:  # minus_box intersects every dimension but the last
            ranges.append((f"in_lo_{x}", f"in_hi_{x}", f"in_n_{x}"))
        for lo, hi, n in ranges:
            lines.append(f"{n} = tl.maximum({hi} - {lo} + 1, 0)")
            size_of[(lo, hi)] = n
    pieces = [{"name": f"term {t}, {('left', 'right')[k % 2]} of term 0's box in dimension {k // 2}",
               "origin": [lo for lo, _ in box], "size": [size_of[r] for r in box]} for k, box in enumerate(boxes)]
    return lines, pieces


def _kernel(plan: KernelPlan, terms, dkdv: bool, maxt: int, shell_free: bool) -> dict:
    """One walking kernel's text: dK/dV (`dkdv`: the program owns a key tile and walks query tiles)
    or dQ (the program owns a query tile and walks key tiles, the forward's way round)."""
    cfg, dims = plan.config, kernel_dims(plan)
    temps = Temps()
    bounds = [line for t in terms for line in row_bounds(str(t["i"]), t["dims"], dims, temps)]
    row_valid = _valid("rows", dims, lambda d: d.ragged_q)
    key_valid = _valid("kc", dims, lambda d: d.ragged_kv)
    if dkdv:
        own = own_tile(dims, lambda d: d.plan.dilation * kv_tiles_per_group(d.plan), lambda d: kv_tiles_per_group(d.plan),
                       lambda d: d.plan.kv_tile, "kfirst")
        lanes = [f"kc_{d.i} = kfirst_{d.i} + {_lane('offs_n', d.kv_inner, d.plan.kv_tile, cfg.block_n)}" for d in dims]
        lanes += [f"qin_{d.i} = {_lane('offs_m', d.q_inner, d.plan.q_tile, cfg.block_m)}" for d in dims]
        walk = [f"rows_{d.i} = {_mul(f'c_{d.i}', d.plan.q_tile)} + qin_{d.i}" for d in dims]
        walk_tile, frames = dims[0].plan.q_tile, ("q_frame0", "q_frame1")
    else:
        own = own_tile(dims, lambda d: d.plan.q_tiles, lambda d: d.plan.q_tiles_per_group, lambda d: d.plan.q_tile,
                       "first")
        lanes = [f"rows_{d.i} = first_{d.i} + {_lane('offs_m', d.q_inner, d.plan.q_tile, cfg.block_m)}" for d in dims]
        lanes += [f"kin_{d.i} = {_lane('offs_n', d.kv_inner, d.plan.kv_tile, cfg.block_n)}" for d in dims]
        walk = [f"kc_{d.i} = {_mul(f'c_{d.i}', d.plan.kv_tile)} + kin_{d.i}" for d in dims]
        walk_tile, frames = dims[0].plan.kv_tile, ("k_frame0", "k_frame1")
    full, partial = _schedule_boxes(plan.rank, plan.full_box, shell_free)
    return {
        "plan": plan, "cfg": cfg, "dims": dims, "own": own, "lanes": lanes, "walk": walk,
        "row_valid": row_valid, "key_valid": key_valid, "row_flat": _flat(dims, "rows"), "key_flat": _flat(dims, "kc"),
        "bounds": bounds, "keep": _keep(terms, dims, dkdv, key_valid, 8),
        "ranges": _ranges(dims, terms, maxt, walk_tile, *frames, plan.full_box, shell_free),
        "full": full, "partial": partial, "shell_free": shell_free,
        "fdiv": any("_fdiv(" in line for line in bounds),
    }


def backward_context(plan_kv: KernelPlan, plan_q: KernelPlan, maxt: tuple[int, int],
                     shell_free: tuple[bool, bool]) -> dict:
    """The backward template's input: the dK/dV kernel's text (`kv`), the dQ kernel's (`qd`), the terms'
    pieces outside term 0's box, and the facts its header states."""
    from maskdsl.version import __version__

    rank = plan_q.rank
    terms = []
    for t, term in enumerate(plan_q.terms):
        lines, pieces = _outside_dominant(t, rank) if t else ([], [])
        terms.append({"i": t, "dims": term, "minus_lines": lines, "pieces": pieces,
                      "phases": [td.dilation if strided(plan_q, term, d) else None for d, td in enumerate(term)]})
    kv = _kernel(plan_kv, terms, True, maxt[0], shell_free[0])
    qd = _kernel(plan_q, terms, False, maxt[1], shell_free[1])
    inner = math.prod(plan_q.shape[1:])
    return dict(
        version=__version__, mask_text=comment_safe(plan_q.mask_text), kv=kv, qd=qd, terms=terms,
        tokens=math.prod(plan_q.shape), inner=inner, columns=COLUMNS,
        kv_tiles=math.prod(d.dilation * kv_tiles_per_group(d) for d in plan_kv.dims),
        dilations=tuple(d.dilation for d in plan_q.dims), fdiv=kv["fdiv"] or qd["fdiv"],
        q_row0=_mul("q_frame0", inner), k_row0=_mul("k_frame0", inner), q_rows=_mul("(q_frame1 - q_frame0)", inner) if inner > 1 else "q_frame1 - q_frame0",
    )
