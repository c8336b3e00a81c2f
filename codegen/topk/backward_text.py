"""What the top-k backward template is rendered with: its tiles' lines, from the forward's pieces.

The backward's query and key tiles are boxes of the grid (codegen.topk.grid), as the forward's;
the rows' key bounds and tile ranges of every S and R term are the forward's own text
(codegen.bounds.term_text), printed again wherever a loop moves to another query tile.
"""

from __future__ import annotations

from maskdsl.codegen.context import _mul, all_of, any_of, query_text
from maskdsl.codegen.printer import Temps
from maskdsl.codegen.render import comment_safe
from maskdsl.codegen.topk.grid import TopKGrid, term_texts
from maskdsl.spec import ir


def backward_context(mask: ir.MaskDef, form, cfg, grid: TopKGrid) -> dict:
    from maskdsl.version import __version__

    rank = grid.rank
    dims = grid.kernel_dims()
    temps = Temps()
    s_terms, r_terms = term_texts(mask, form, grid, temps)

    def inside(kind, terms_):
        return [all_of([f"(c_{d} >= {kind}_lo_{t.label}_{d}) & (c_{d} <= {kind}_hi_{t.label}_{d})"
                      for d in range(rank)]) for t in terms_]

    def pred(terms_):
        return any_of([all_of([f"_between(kc_{d}, lo_{t.label}_{d}, hi_{t.label}_{d})" for d in range(rank)])
                       for t in terms_], "False")

    def lines(terms_):
        return [line for t in terms_ for line in t.rows + t.tiles]

    q = query_text(dims, grid.tile_volume, grid.tile_volume, tma=False)
    query_lines = []  # query tile (qc_0, ..): its first and last coordinates, then its rows
    for d in dims:
        n, t = d.plan.extent, d.plan.q_tile
        query_lines.append(f"first_{d.i} = {_mul(f'qc_{d.i}', t)}")
        if t == 1:
            last = f"first_{d.i}"
        elif d.ragged_q:
            last = f"tl.minimum(first_{d.i} + {t}, {n}) - 1"
        else:
            last = f"first_{d.i} + {t - 1}"
        query_lines.append(f"last_{d.i} = {last}")
    query_lines += q.rows + [f"row_valid = {q.row_valid or 'offs_m >= 0'}", f"row_flat = {q.row_flat}"]

    key_lines = [f"kc_{d.i} = {_mul(f'c_{d.i}', d.plan.kv_tile)} + koff_{d.i}" for d in dims]
    valid = [f"kc_{d.i} < {d.plan.extent}" for d in dims if d.ragged_kv]
    key_lines.append(f"key_valid = {all_of(valid) if valid else 'offs_n >= 0'}")
    key_lines.append("key_flat = " + " + ".join(_mul(f"kc_{d.i}", d.plan.stride) for d in dims))

    def box_loop(var, lo, hi):
        """(start line, tile count, step line) walking the box lo_d..hi_d of tile coordinates var_d."""
        names = [f"{var}_{d}" for d in range(rank)]
        return dict(start=f"{', '.join(names)} = {', '.join(lo(d) for d in range(rank))}",
                    count=" * ".join(f"({hi(d)} - {lo(d)} + 1)" for d in range(rank)),
                    next=f"{', '.join(names)} = _next_tile(" + ", ".join(
                        names + [x for d in range(1, rank) for x in (lo(d), hi(d))]) + ")")

    width = max(grid.tiles)
    s_table = [box_loop("qc", lambda d, s=s: f"qlo_{d}", lambda d: f"qhi_{d}") for s in range(len(s_terms))]
    def entry(offset: int, d: int) -> str:
        return f"S_QT + {offset} + c_{d}" if offset else f"S_QT + c_{d}"

    table_loads = [[(f"qlo_{d}", entry((s * rank + d) * 2 * width, d)) for d in range(rank)]
                   + [(f"qhi_{d}", entry(((s * rank + d) * 2 + 1) * width, d)) for d in range(rank)]
                   for s in range(len(s_terms))]
    s_key_loops = [box_loop("c", lambda d, t=t: f"kt_lo_{t.label}_{d}", lambda d, t=t: f"kt_hi_{t.label}_{d}")
                   for t in s_terms]
    tpb = grid.tpb
    r_full = any_of(inside("full", r_terms), "False")
    if grid.ragged("c"):
        r_full = f"~({grid.ragged('c')}) & ({r_full})"
    next_params = [f"c_{d}" for d in range(rank)] + [f"box_{s}_{d}" for d in range(1, rank) for s in ("lo", "hi")]
    next_lines = [f"c_{rank - 1} += 1"]
    for d in reversed(range(1, rank)):
        next_lines += [f"wrap = c_{d} > box_hi_{d}", f"c_{d - 1} = tl.where(wrap, c_{d - 1} + 1, c_{d - 1})",
                       f"c_{d} = tl.where(wrap, box_lo_{d}, c_{d})"]
    past_key = grid.past_grid("c")
    return dict(
        version=__version__, mask_text=comment_safe(mask.expr.fmt()), topk=form.topk, grid=grid,
        tokens=mask.layout.tokens, cfg=cfg, tile=grid.tile_volume, nblocks=grid.nblocks,
        k_eff=min(form.topk.k, grid.nblocks), tpb=tpb, s_terms=s_terms,
        fdiv=any("_fdiv(" in line for t in s_terms + r_terms for line in t.rows + t.tiles),
        s_lines=lines(s_terms), r_lines=lines(r_terms), query_lines=query_lines, key_lines=key_lines,
        key_offsets=q.key_offsets, key_decode=_decode("kt", "c", grid.tiles), query_decode=_decode("qt", "qc", grid.tiles),
        kb=grid.block_of_tiles("c"), qblock=grid.block_of_rows("first"),
        s_mine=[all_of([inside("kt", s_terms)[s]] + ([f"~({any_of(inside('kt', s_terms[:s]), 'False')})"] if s else []))
                for s in range(len(s_terms))],
        s_loops=s_table, table_loads=table_loads, s_key_loops=s_key_loops,
        s_earlier=[any_of(inside("kt", s_terms[:s]), "False") if s else "" for s in range(len(s_terms))],
        s_visit=any_of(inside("kt", s_terms), "False"), s_full=any_of(inside("full", s_terms), "False"),
        r_visit=any_of(inside("kt", r_terms), "False"), r_full=r_full,
        s_keep=f"{pred(s_terms)} | (pk & ({pred(r_terms)}))", r_keep=pred(r_terms),
        pick_query=(["qblock = tl.load(t_q + it)"] if tpb == 1 else
                    ["qblock = tl.load(t_q + it // %d)" % tpb, f"sub = it % {tpb}"])
        + grid.tiles_of_pick("qc", "qblock", "sub"),
        query_past=grid.past_grid("qc"),
        pick_key=(["kb = tl.load(idx_row + it)"] if tpb == 1 else
                  [f"kb = tl.load(idx_row + it // {tpb})", f"sub = it % {tpb}"]) + grid.tiles_of_pick("c", "kb", "sub"),
        key_skip=any_of(([f"({past_key})"] if past_key else []) + inside("kt", s_terms)) if past_key or s_terms else "",
        next_params=", ".join(next_params), next_lines=next_lines, cvars=", ".join(f"c_{d}" for d in range(rank)),
    )


def _decode(flat: str, coord: str, extents: tuple[int, ...]) -> list[str]:
    """Lines setting coord_d to the row-major coordinates of `flat` over `extents`."""
    rank = len(extents)
    out = []
    stride = 1
    for d in reversed(range(rank)):
        q = flat if stride == 1 else f"({flat} // {stride})"
        out.append(f"{coord}_{d} = {q}" if d == 0 else f"{coord}_{d} = {q} % {extents[d]}")
        stride *= extents[d]
    return out[::-1]
