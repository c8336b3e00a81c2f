"""What the templates are rendered with: a plan turned into the kernel's names and lines.

Dimension-generic text is built here (jinja is poor at it); the templates lay it out. Identities
fold as the text is built: an undilated dimension has no group (g = 0) and a constant length, a
tile that divides its dimension needs no bounds check, a tile extent of 1 no division.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from maskdsl.codegen.bounds import KernelDim, TermText, term_text
from maskdsl.codegen.plan import KernelPlan
from maskdsl.codegen.printer import Temps, to_triton

LINE = 110


def kernel_dims(plan: KernelPlan) -> list[KernelDim]:
    cfg, rank = plan.config, plan.rank
    out = []
    for d, dp in enumerate(plan.dims):
        q_inner = kv_inner = 1
        for k in range(d + 1, rank):
            q_inner *= cfg.q_tile[k]
            kv_inner *= cfg.kv_tile[k]
        out.append(KernelDim(d, dp, q_inner, kv_inner))
    return out


# What the names in a rendered kernel mean, stated at the top of every kernel file (`notation`).
_NOTATION = {
    "common": [
        "a name ending _<t>_<d> belongs to product term t and grid dimension d (_<d>: dimension d alone)",
        "rows_d, kc_d: coordinates of a tile's query rows and keys; c_d: a key or query tile's coordinate in tiles",
        "g_d, n_d: a dilated dimension's group and its length (coordinates count within the group)",
        "lo, hi: each query row's first and last key, the predicate of a partial tile (inclusive)",
    ],
    "forward": [
        "kt_lo, kt_hi: the key tiles a query tile visits; full_lo, full_hi: those all its rows see whole",
        "(full tiles run without mask arithmetic, the shell of partial tiles around them with it)",
    ],
    "backward": [
        "tix_d: the program's own tile, its row of the range table TBL (maskdsl.analysis.tile_table: columns A, B, FA, FB)",
        "a, b: the other kind's tiles the program's tile visits; fa, fb: those it sees whole; nb, nf: how many",
        "(pairs seen whole run without mask arithmetic, the partial shell around them with it)",
    ],
    "topk": [
        "terms s<i> form the static part S, terms r<i> the restriction R of picked blocks: S | (picked & R)",
        "kt_lo, kt_hi: the key tiles a query tile visits; full_lo, full_hi: those all its rows see whole",
    ],
}


def notation(kind: str) -> str:
    """The comment block naming a kernel file's variables: `forward`, `backward`, `topk` (both ways)."""
    lines = _NOTATION["common"] + _NOTATION[kind]
    return "\n".join(["# notation:"] + [f"#   {line}" for line in lines])


def _mul(name: str, factor: int) -> str:
    return name if factor == 1 else f"{name} * {factor}"


def _lane(offs: str, inner: int, tile: int, block: int) -> str:
    """Which step of this dimension each row (or key) of a tile is: (offs // inner) % tile, folded."""
    if tile == 1:
        return f"{offs} * 0"
    step = offs if inner == 1 else f"{offs} // {inner}"
    if inner * tile == block:
        return step
    return f"{step} % {tile}" if inner == 1 else f"({step}) % {tile}"


def _flat(dims: list[KernelDim], coord: str) -> str:
    """Row-major token index of per-dimension group coordinates `coord_d`."""
    return " + ".join(_mul(d.coordinate(f"{coord}_{d.i}"), d.plan.stride) for d in dims)


def _conj(parts: list[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return " & ".join(f"({p})" for p in parts)


@dataclass
class QueryText:
    """The query tile's lines, shared by every template (`attention_common.start` / `finish`)."""

    block_m: int
    block_n: int
    tma: bool
    decode: list[str] = field(default_factory=list)
    rows: list[str] = field(default_factory=list)
    key_offsets: list[str] = field(default_factory=list)
    row_valid: str = ""
    row_flat: str = ""
    tma_offsets: str = ""
    tma_box: str = ""

    @property
    def row_mask(self) -> str:
        return ", mask=row_valid[:, None], other=0.0" if self.row_valid else ""

    @property
    def row_mask_store(self) -> str:
        return ", mask=row_valid[:, None]" if self.row_valid else ""

    @property
    def lse_mask(self) -> str:
        return ", mask=row_valid" if self.row_valid else ""


def query_text(dims: list[KernelDim], block_m: int, block_n: int, tma: bool) -> QueryText:
    """Decode pid_m into per-dimension group g_d and coordinates first_d..last_d, then each row's."""
    out = QueryText(block_m, block_n, tma)
    rank = len(dims)
    tile = "pid_m" if rank == 1 else "tile"
    if rank > 1:
        out.decode.append("tile = pid_m")
    for d in reversed(dims):
        p = d.plan
        # the slowest dimension takes what is left: pid_m < Q_TILES
        qt = tile if d.i == 0 else f"{tile} % {p.q_tiles}"
        if p.dilation > 1:
            out.decode.append(f"g_{d.i} = {qt if d.i == 0 else f'({qt})'} // {p.q_tiles_per_group}")
            pos = f"{tile} % {p.q_tiles_per_group}"
            if d.group_len_const is None:
                out.decode.append(f"n_{d.i} = ({p.extent} - g_{d.i} + {p.dilation - 1}) // {p.dilation}")
        else:
            pos = qt
        out.decode.append(f"first_{d.i} = {_mul(pos if pos == tile else f'({pos})', p.q_tile)}")
        n = to_triton(d.n)
        if p.q_tile == 1:
            last = f"first_{d.i}"
        elif d.ragged_q:
            last = f"tl.minimum(first_{d.i} + {p.q_tile}, {n}) - 1"
        else:
            last = f"first_{d.i} + {p.q_tile - 1}"
        out.decode.append(f"last_{d.i} = {last}")
        if d.i > 0:
            out.decode.append(f"{tile} //= {p.q_tiles}")
    for d in dims:
        out.rows.append(f"rows_{d.i} = first_{d.i} + {_lane('offs_m', d.q_inner, d.plan.q_tile, block_m)}")
        out.key_offsets.append(f"koff_{d.i} = {_lane('offs_n', d.kv_inner, d.plan.kv_tile, block_n)}")
    out.row_valid = _conj([f"rows_{d.i} < {to_triton(d.n)}" for d in dims if d.ragged_q])
    out.row_flat = _flat(dims, "rows")
    out.tma_offsets = ", ".join(f"first_{d.i}" for d in dims)
    out.tma_box = ", ".join(str(d.plan.q_tile) for d in dims)
    return out


def wrap(head: str, args: list, indent: int, tail: str = ")") -> list[str]:
    """`head` + the args + `tail`, broken after commas into lines of at most LINE characters (counting
    `indent` spaces before each); continuation lines line up under the first argument. An arg that
    is a list is a group: it starts a line of its own."""
    lines, cur = [], head
    items = [(a, False) if isinstance(a, str) else (x, k == 0) for a in args
             for k, x in (enumerate(a) if not isinstance(a, str) else [(0, a)])]
    for k, (a, starts) in enumerate(items):
        piece = a + (", " if k < len(items) - 1 else tail)
        if cur != head and (starts or indent + len(cur) + len(piece.rstrip()) > LINE):
            lines.append(cur.rstrip())
            cur = " " * len(head) + piece
        else:
            cur += piece
    lines.append(cur)
    return lines


def any_of(conds: list[str], empty: str = "") -> str:
    """Triton text for "any of these conditions" (each parenthesized when there are several)."""
    if not conds:
        return empty
    return conds[0] if len(conds) == 1 else " | ".join(f"({c})" for c in conds)


def all_of(conds: list[str]) -> str:
    """Triton text for "all of these conditions"."""
    return conds[0] if len(conds) == 1 else " & ".join(f"({c})" for c in conds)


def join(head: str, parts: list[str], sep: str, indent: int, close: str = "") -> list[str]:
    """`head part sep part ... close` on one line if it fits, else in parentheses, one break per sep."""
    one = head + sep.join(parts) + close
    if indent + len(one) <= LINE:
        return [one]
    if not head.endswith("("):
        head, close = head + "(", close + ")"
    lines, cur = [], head
    for k, p in enumerate(parts):
        piece = p if k == 0 else sep + p
        if k and indent + len(cur) + len(piece) > LINE:
            lines.append(cur)
            cur = " " * len(head) + piece.lstrip()
        else:
            cur += piece
    lines.append(cur + close)
    return lines


def static_context(plan: KernelPlan) -> dict:
    from maskdsl.version import __version__

    cfg = plan.config
    dims = kernel_dims(plan)
    temps = Temps()
    single = len(plan.terms) == 1
    terms = [term_text(str(t), term, dims, temps, full=t == 0 and plan.full_box) for t, term in enumerate(plan.terms)]
    q = query_text(dims, cfg.block_m, cfg.block_n, plan.tma_ok)
    # a segment's copy-engine boxes count dimension 0 from its first frame (codegen.segment)
    q.tma_offsets = ", ".join([f"first_{dims[0].i} - q_frame0"] + [f"first_{d.i}" for d in dims[1:]])
    cvars = [f"c_{d.i}" for d in dims]

    ctx = [f"koff_{d.i}" for d in dims]
    for d in dims:
        if d.plan.dilation > 1:
            ctx.append(f"g_{d.i}")
            if d.group_len_const is None:
                ctx.append(f"n_{d.i}")
    ctx += [f"{b}_{t.label}_{d.i}" for t in terms for d in dims for b in ("lo", "hi")]
    ctx += ["k_base", "v_base", "stride_kl", "stride_vl", "desc_k", "desc_v", "bh_kv", "k_frame0"]
    consts = ["HEAD_DIM", "HEAD_DIM_PAD", "TMA", "DOT_F32"]
    decl = [f"{c}: tl.constexpr" for c in consts]
    state = ["acc", "m_i", "l_i", "q", "qk_scale"]

    key_lines = [f"kc_{d.i} = {_mul(f'c_{d.i}', d.plan.kv_tile)} + koff_{d.i}" for d in dims]
    valid = [f"kc_{d.i} < {to_triton(d.n)}" for d in dims if d.ragged_kv]
    if valid:
        key_lines.append(f"key_valid = {_conj(valid)}")
    predicate = []
    for t in terms:
        parts = []
        for d, phase in zip(dims, t.phases):
            parts.append(f"_between(kc_{d.i}, lo_{t.label}_{d.i}, hi_{t.label}_{d.i})")
            if phase:
                parts.append(f"((kc_{d.i}[None, :] - lo_{t.label}_{d.i}[:, None]) % {phase} == 0)")
        predicate += join("keep = keep | (" if predicate else "keep = ", parts, " & ", 8, ")" if predicate else "")
    if valid:
        predicate.append("keep = keep & key_valid[None, :]")

    box = [f"box_{s}_{d.i}" for d in dims for s in ("lo", "hi")]
    box_ctx = [c for c in ctx if not c.startswith("koff_")]  # the box computes them before its loop
    next_params = cvars + [f"box_{s}_{d.i}" for d in dims[1:] for s in ("lo", "hi")]
    next_lines = [f"c_{dims[-1].i} += 1"]
    for d in reversed(dims[1:]):
        next_lines += [f"wrap = c_{d.i} > box_hi_{d.i}",
                       f"c_{d.i - 1} = tl.where(wrap, c_{d.i - 1} + 1, c_{d.i - 1})",
                       f"c_{d.i} = tl.where(wrap, box_lo_{d.i}, c_{d.i})"]
    attend = wrap("acc, m_i, l_i = _attend_tile(", state + cvars + ctx + consts + ["MASKED"], 8)

    return {
        "version": __version__, "plan": plan, "cfg": cfg, "terms": terms, "q": q,
        "tokens": math.prod(plan.shape), "dilations": tuple(d.dilation for d in plan.dims),
        "fdiv": any("_fdiv(" in line for t in terms for line in t.rows + t.tiles),
        "cvars": ", ".join(cvars),
        "tile_params": _params(state + cvars + ctx + decl + ["MASKED: tl.constexpr"], "def _attend_tile("),
        "box_params": _params(state + box + box_ctx + decl + ["MASKED: tl.constexpr"], "def _attend_box("),
        "box_stages": cfg.num_stages,
        "full_box": plan.full_box,
        "inline_tiles": len(plan.terms) > 2,
        "next_params": ", ".join(next_params),
        "key_lines": key_lines, "key_valid": "key_valid" if valid else "None",
        "load_masked": "MASKED" if valid else "False",
        "key_flat": _flat(dims, "kc"),
        "kv_tma_offsets": ", ".join([f"{_mul(f'c_{dims[0].i}', dims[0].plan.kv_tile)} - k_frame0"]
                                    + [_mul(f"c_{d.i}", d.plan.kv_tile) for d in dims[1:]]),
        "inner": math.prod(plan.shape[1:]),
        "segment_lines": segment_clamp(dims[0], terms, plan.full_box),
        "predicate": predicate,
        "box_lo": ", ".join(f"box_lo_{d.i}" for d in dims),
        "box_count": " * ".join(_extent(f"box_lo_{d.i}", f"box_hi_{d.i}", len(dims)) for d in dims),
        "attend_in_box": "\n        ".join(attend),
        "next_in_box": ", ".join(next_params),
        "next_lines": next_lines,
        "loops": _dominant_loops(plan, dims, state, box_ctx, consts) if single
        else _union_loops(plan, dims, terms, state, ctx, box_ctx, consts),
    }


def segment_clamp(dim0: KernelDim, terms: list[TermText], full_box: bool) -> list[str]:
    """Clamp every term's key tiles along dimension 0 to the segment's buffer (codegen.segment).

    The buffer's tiles are [kt_first, kt_last]; the whole grid's clamp binds nowhere. Term 0's
    fully-seen range is clamped into its clamped visited range so that the full box and the 2 x rank
    slabs around it still partition it: a full range left (right) of the buffer becomes the empty
    range at the buffer's first (past its last) tile, and the slab on the other side takes it all.
    The other terms' boxes minus term 0's are then the buffer's part of what they were.
    """
    T = dim0.plan.kv_tile
    lines = [f"kt_first = {_div('k_frame0', T)}",
             f"kt_last = {_div(f'k_frame1 + {T - 1}' if T > 1 else 'k_frame1', T)} - 1"]
    for t in terms:
        x = f"{t.label}_{dim0.i}"
        lines += [f"kt_lo_{x} = tl.maximum(kt_lo_{x}, kt_first)", f"kt_hi_{x} = tl.minimum(kt_hi_{x}, kt_last)"]
    if full_box:
        x = f"{terms[0].label}_{dim0.i}"
        lines += [f"full_lo_{x} = tl.maximum(kt_lo_{x}, tl.minimum(full_lo_{x}, kt_hi_{x} + 1))",
                  f"full_hi_{x} = tl.minimum(kt_hi_{x}, tl.maximum(full_hi_{x}, kt_lo_{x} - 1))"]
    return lines


def _div(name: str, T: int) -> str:
    if T == 1:
        return name
    return f"({name}) // {T}" if " " in name else f"{name} // {T}"


def _params(names: list[str], head: str) -> str:
    return "\n".join(wrap(head, names, 0, tail=""))[len(head):]


def _box_call(box: list[tuple[str, str]], state, ctx, consts, masked: bool) -> list[str]:
    """The call visiting one box; a line each for the softmax state, the box, the rest."""
    args = [state, [x for lo_hi in box for x in lo_hi], ctx + consts + [f"MASKED={masked}"]]
    return wrap("acc, m_i, l_i = _attend_box(", args, 4)


@dataclass
class Loop:
    comment: str
    lines: list[str]


def _dominant_loops(plan, dims, state, ctx, consts) -> list[Loop]:
    """Term 0 (the only one, or a union's dominant one): the box every row fully sees runs
    unmasked, the shell around it is 2 x rank slabs that evaluate the (union's) predicate."""
    def rng(kind, d):
        return (f"{kind}_lo_0_{d.i}", f"{kind}_hi_0_{d.i}")

    if not plan.full_box:
        return [Loop("term 0: its box of key tiles (a strided term has no fully-seen tiles)",
                     _box_call([rng("kt", d) for d in dims], state, ctx, consts, True))]
    loops = [Loop("full tiles: every row sees every key, no mask arithmetic",
                  _box_call([rng("full", d) for d in dims], state, ctx, consts, False))]
    if plan.shell_free:
        loops.append(Loop("no partial tiles: for this mask and these tiles every visited tile is full "
                          "(checked at plan time)", []))
        return loops
    for d in dims:
        for side in ("left", "right"):
            box = []
            for k in dims:
                if k.i < d.i:
                    box.append(rng("full", k))
                elif k.i > d.i:
                    box.append(rng("kt", k))
                elif side == "left":
                    box.append((f"kt_lo_0_{k.i}", f"full_lo_0_{k.i} - 1"))
                else:
                    box.append((f"full_hi_0_{k.i} + 1", f"kt_hi_0_{k.i}"))
            loops.append(Loop(f"partial tiles {side} of the full box in dimension {d.i}",
                              _box_call(box, state, ctx, consts, True)))
    return loops


def minus_box(dims, s: str, lo: str, hi: str, base: str) -> tuple[list[str], list[list[tuple[str, str]]]]:
    """(lines, pieces): term s's box of tiles [lo_s, hi_s] minus term `base`'s, as at most 2 x rank
    disjoint boxes. Piece (d, side) keeps dimensions before d inside both boxes, takes dimension d
    left or right of the base box, and leaves the dimensions after d whole. `lo`/`hi` name the
    range variables (`{lo}_{term}_{dim}`); empty ranges have hi < lo in some dimension.
    """
    lines, pieces = [], []
    for d in dims:
        x, b = f"{s}_{d.i}", f"{base}_{d.i}"
        lines.append(f"left_hi_{x} = tl.minimum({hi}_{x}, {lo}_{b} - 1)")
        lines.append(f"right_lo_{x} = tl.maximum({lo}_{x}, {hi}_{b} + 1)")
        if d.i < dims[-1].i:
            lines.append(f"in_lo_{x} = tl.maximum({lo}_{x}, {lo}_{b})")
            lines.append(f"in_hi_{x} = tl.minimum({hi}_{x}, {hi}_{b})")
    for d in dims:
        for side in ("left", "right"):
            box = []
            for k in dims:
                x = f"{s}_{k.i}"
                if k.i < d.i:
                    box.append((f"in_lo_{x}", f"in_hi_{x}"))
                elif k.i > d.i:
                    box.append((f"{lo}_{x}", f"{hi}_{x}"))
                elif side == "left":
                    box.append((f"{lo}_{x}", f"left_hi_{x}"))
                else:
                    box.append((f"right_lo_{x}", f"{hi}_{x}"))
            pieces.append(box)
    return lines, pieces


def _union_loops(plan, dims, terms: list[TermText], state, ctx, box_ctx, consts) -> list[Loop]:
    """Several terms: term 0 (the dominant one) runs like a single term; every other term visits
    only its box minus term 0's (2 x rank boxes, masked with the union's predicate), and skips
    tile by tile what an earlier non-dominant term's box covered (those boxes are small: sinks)."""
    cvars = [f"c_{d.i}" for d in dims]
    loops = _dominant_loops(plan, dims, state, box_ctx, consts)
    attend = wrap("acc, m_i, l_i = _attend_tile(", state + cvars + ctx + consts + ["MASKED=True"], 12)
    for k, t in enumerate(terms[1:], start=1):
        s = t.label
        lines, pieces = minus_box(dims, s, "kt_lo", "kt_hi", "0")
        if k == 1:
            for box in pieces:
                lines += _box_call(box, state, box_ctx, consts, True)
            loops.append(Loop(f"term {s}: its tiles outside term 0's box, masked", lines))
            continue
        seen = [" & ".join(f"(c_{d.i} >= kt_lo_{u.label}_{d.i}) & (c_{d.i} <= kt_hi_{u.label}_{d.i})" for d in dims)
                for u in terms[1:k]]
        if len(seen) > 1:
            seen = [f"({x})" for x in seen]
        for box in pieces:
            lines += [f"{', '.join(cvars)} = {', '.join(lo for lo, _ in box)}",
                      "n_tiles = " + " * ".join(_extent(lo, hi, len(dims)) for lo, hi in box),
                      "for _ in tl.range(0, n_tiles):"]
            lines += ["    " + ln for ln in join("seen = ", seen, " | ", 8)]
            lines.append("    if not seen:")
            lines += ["        " + ln for ln in attend]
            step = cvars + [x for lo, hi in box[1:] for x in (lo, hi)]
            lines.append(f"    {', '.join(cvars)} = _next_tile({', '.join(step)})")
        loops.append(Loop(f"term {s}: its tiles outside term 0's box, masked, except those an earlier "
                          "term's box covered", lines))
    return loops


def _extent(lo: str, hi: str, rank: int) -> str:
    """A box's tile count in one dimension; clamped at 0 where another dimension may be empty too
    (two negative counts would multiply to a positive one)."""
    return f"({hi} - {lo} + 1)" if rank == 1 else f"tl.maximum({hi} - {lo} + 1, 0)"
