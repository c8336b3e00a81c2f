"""Document masks: the tiles the kernels visit for actual offsets, and the time the cost model gives them.

The kernels (codegen.documents) visit, per query tile, the union of each term's span of key tiles and run
without a predicate the tiles some term holds whole for every row; the backward's dK/dV programs walk
the transposed spans per key tile, its dQ programs the forward's. Here the same spans are computed with
numpy from the same rule (maskdsl.spec.documents.row_interval / column_interval), counted per program,
and costed with the per-GPU constants of simulator/cost.py: a full pair at c_full, a partial one at
c_partial, each program its c_tile, greedy list scheduling over the SMs (simulator/schedule.py). The
bound is the visited pairs at the full-pair rate spread evenly over the SMs (no predicate, no imbalance,
no fixed costs): what no schedule of these tiles can beat with these constants.

`draw_offsets` (maskdsl.spec.documents) draws a layout from a length distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from maskdsl.simulator.cost import REFERENCE_TILE, CostModel
from maskdsl.simulator.schedule import list_schedule
from maskdsl.spec import ir
from maskdsl.spec.documents import DocTerm, document_form

BIG = np.iinfo(np.int64).max // 4


@dataclass(frozen=True)
class DocumentTiles:
    """Per program (query tile for the forward and dQ, key tile for dK/dV): tile pairs it visits."""

    full: np.ndarray
    partial: np.ndarray

    @property
    def visited(self) -> int:
        return int(self.full.sum() + self.partial.sum())


def _token_meta(offsets, prefix, length: int, inner: int = 1):
    """Each token's document start, end (tokens) and prefix length; offsets count frames of `inner` tokens."""
    offsets = np.clip(np.asarray(offsets, dtype=np.int64), 0, length // inner)
    frame = np.arange(length) // inner
    doc = np.clip(np.searchsorted(offsets, frame, side="right") - 1, 0, len(offsets) - 2)
    start, end = offsets[doc] * inner, offsets[doc + 1] * inner
    plen = np.zeros(length, np.int64) if prefix is None else np.clip(np.asarray(prefix, np.int64)[doc], 0, end - start)
    return start, end, plen


def _rows(term: DocTerm, i, s, e, p, inner: int = 1):
    """numpy form of maskdsl.spec.documents.row_interval over arrays of rows."""
    lo, hi = s.copy(), e.copy()
    if term.causal:
        hi = np.minimum(hi, i + 1)
    fi, fs, fe = i // inner, s // inner, e // inner
    if term.window_causal:
        lo, hi = np.maximum(lo, (fi - term.window_causal + 1) * inner), np.minimum(hi, (fi + 1) * inner)
    if term.window:
        n = fe - fs
        w = np.minimum(term.window, n)
        first = fs + np.minimum(np.maximum(fi - fs - w // 2, 0), n - w)
        lo, hi = np.maximum(lo, first * inner), np.minimum(hi, (first + w) * inner)
    if term.prefix:
        hi = np.minimum(hi, s + p)
    if term.sink_keys:
        hi = np.minimum(hi, s + term.sink_keys)
    if term.sink_queries:
        hi = np.where(i - s < term.sink_queries, hi, lo)
    return lo, hi


def _columns(term: DocTerm, j, s, e, p, inner: int = 1):
    """numpy form of maskdsl.spec.documents.column_interval over arrays of keys."""
    lo, hi = s.copy(), e.copy()
    if term.causal:
        lo = np.maximum(lo, j)
    fj, fs, fe = j // inner, s // inner, e // inner
    if term.window_causal:
        lo, hi = np.maximum(lo, fj * inner), np.minimum(hi, (fj + term.window_causal) * inner)
    if term.window:
        w = np.minimum(term.window, fe - fs)
        h = w // 2
        lo = np.maximum(lo, np.where(fj - w < fs, s, (fj - w + h + 1) * inner))
        hi = np.minimum(hi, np.where(fj >= fe - w, e, (fj + h + 1) * inner))
    if term.prefix:
        hi = np.where(j - s < p, hi, lo)
    if term.sink_keys:
        hi = np.where(j - s < term.sink_keys, hi, lo)
    if term.sink_queries:
        hi = np.minimum(hi, s + term.sink_queries)
    return lo, hi


def _count(intervals, length: int, own: int, other: int) -> DocumentTiles:
    """Per program of `own` tokens: pairs visited (union of the terms' spans of `other`-token tiles) and full."""
    programs = -(-length // own)
    pad = programs * own - length
    full = np.zeros(programs, np.int64)
    partial = np.zeros(programs, np.int64)
    spans, whole = [], []
    for lo, hi in intervals:
        lo = np.concatenate([lo, np.full(pad, BIG)]).reshape(programs, own)
        hi = np.concatenate([hi, np.full(pad, -BIG)]).reshape(programs, own)
        some = lo < hi
        a = np.where(some, lo, BIG).min(1)
        b = np.where(some, hi, 0).max(1)
        spans.append((np.where(a == BIG, BIG, a // other), -(-b // other)))
        valid = np.arange(programs * own).reshape(programs, own) < length
        top = np.where(valid, lo, 0).max(1)
        bottom = np.where(valid, hi, BIG).min(1)
        whole.append((-(-top // other), bottom // other))
    for m in range(programs):
        visited = _union([(int(a[m]), int(b[m])) for a, b in spans])
        fulls = _union([(int(f[m]), int(g[m])) for f, g in whole])
        full[m] = fulls
        partial[m] = visited - fulls
    return DocumentTiles(full, partial)


def _union(spans) -> int:
    total, reach = 0, -BIG
    for a, b in sorted(s for s in spans if s[0] < s[1]):
        if b > reach:
            total += b - max(a, reach)
            reach = b
    return total


def document_tiles(expr: ir.MaskExpr, shape, offsets, prefix=None, block_m: int = 128, block_n: int = 64,
                   transposed: bool = False) -> DocumentTiles:
    """Forward / dQ (`transposed` False: programs are query tiles of block_m tokens over key tiles of block_n)
    or dK/dV (True: programs are key tiles of block_n over query tiles of block_m). `shape` is the layout's
    (an int: 1-D); offsets count its frames along dimension 0."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    length = int(np.prod(shape))
    inner = length // shape[0]
    terms = document_form(expr, shape).terms
    s, e, p = _token_meta(offsets, prefix, length, inner)
    tok = np.arange(length, dtype=np.int64)
    rule = _columns if transposed else _rows
    intervals = [rule(t, tok, s, e, p, inner) for t in terms]
    return _count(intervals, length, block_n if transposed else block_m, block_m if transposed else block_n)


@dataclass(frozen=True)
class DocumentPrediction:
    forward_us: float
    forward_bound_us: float
    backward_us: float | None
    backward_bound_us: float | None
    pairs: int  # visited (query tile, key tile) pairs of the forward, one head
    full: int
    flops: float  # executed forward FLOPs (visited pairs), all heads

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def predict_documents(expr: ir.MaskExpr, shape, offsets, prefix=None, heads: int = 1, batch: int = 1,
                      head_dim: int = 128, gpu: str | None = None, forward_tiles=(128, 64),
                      dkdv_tiles=(32, 128), dq_tiles=(128, 64)) -> DocumentPrediction:
    """Predicted forward and backward time (us) of one call with these offsets (frames of the layout's
    `shape`, an int on 1-D), and their bounds."""
    model = CostModel.for_gpu(gpu)
    if model.tile_us is None:
        raise ValueError(f"the cost entry for {model.name!r} has no tile_us: it predicts no times")
    bm, bn = forward_tiles
    fwd = document_tiles(expr, shape, offsets, prefix, bm, bn)
    scale = (bm * bn / REFERENCE_TILE**2) ** model.pair_exponent * head_dim / 128
    copies = heads * batch
    per = (fwd.full * model.c_full + fwd.partial * model.c_partial) * scale + model.c_tile
    forward_us = list_schedule(np.tile(per, copies), model.sms) * model.tile_us + model.launch_us
    bound = fwd.visited * copies * model.c_full * scale * model.tile_us / model.sms
    backward = backward_bound = None
    if model.bwd_dkdv_us is not None and model.bwd_dq_us is not None:
        beta = model.bwd_pair_exponent or model.pair_exponent
        dkdv = document_tiles(expr, shape, offsets, prefix, *dkdv_tiles, transposed=True)
        dq = document_tiles(expr, shape, offsets, prefix, *dq_tiles)
        times, ideal = 0.0, 0.0
        for tiles, us, (m, n) in ((dkdv, model.bwd_dkdv_us, dkdv_tiles), (dq, model.bwd_dq_us, dq_tiles)):
            pair = us * (m * n / REFERENCE_TILE**2) ** beta * head_dim / 128
            per = (tiles.full + tiles.partial * model.bwd_partial) * pair + model.bwd_program_us
            times += list_schedule(np.tile(per, copies), model.sms) + model.launch_us
            ideal += tiles.visited * copies * pair / model.sms
        backward, backward_bound = times, ideal
    flops = 4.0 * fwd.visited * bm * bn * head_dim * copies
    return DocumentPrediction(forward_us, bound, backward, backward_bound, fwd.visited, int(fwd.full.sum()), flops)


def simulate_cli(args, spec: ir.Spec, mdef: ir.MaskDef) -> int:
    """`maskdsl simulate` of a document mask: 8 draws from --lengths LOW,HIGH (or the offsets given), mean
    prediction and bound. Prefix lengths, where the mask has them, are drawn in [0, half the document]."""
    import json
    import random
    import sys

    from maskdsl.spec.documents import draw_offsets

    length = mdef.layout.shape[0]  # what the offsets count: frames along dimension 0 (tokens on 1-D)
    inner = mdef.layout.tokens // length
    att = spec.attention_for(mdef.name)
    heads, head_dim, batch = (att.heads, att.head_dim, att.batch) if att else (1, 128, 1)
    given = tuple(args.lengths or ())
    rng = random.Random(0)
    if len(given) > 2:
        draws = [list(given)]
        if given[0] != 0 or given[-1] != length or any(b < a for a, b in zip(given, given[1:])):
            raise ValueError(f"--lengths with offsets must run from 0 to {length} without decreasing, "
                             f"got {list(given)}")
    else:
        low, high = given if len(given) == 2 else (length, length)
        draws = [draw_offsets(length, low, high, rng) for _ in range(8)]
    rows = []
    for offsets in draws:
        sizes = [b - a for a, b in zip(offsets, offsets[1:])]
        uses_prefix = document_form(mdef.expr, mdef.layout.shape).uses_prefix
        prefix = [rng.randint(0, s * inner // 2) for s in sizes] if uses_prefix else None
        rows.append(predict_documents(mdef.expr, mdef.layout.shape, offsets, prefix, heads, batch, head_dim,
                                      args.gpu).as_dict())
    mean = {k: (None if any(r[k] is None for r in rows) else float(np.mean([r[k] for r in rows]))) for k in rows[0]}
    if args.json:
        json.dump({"file": args.file, "mask": mdef.name, "draws": len(rows), "mean": mean}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"simulation of {mdef.name} = {mdef.expr.fmt()} over {len(rows)} draw(s) of documents, {heads} head(s), "
          f"head_dim {head_dim}")
    print(f"  forward  {mean['forward_us']:.1f} us predicted, bound {mean['forward_bound_us']:.1f} us; "
          f"{mean['pairs']:.0f} tile pairs of 128x64 per head, {mean['full']:.0f} full")
    if mean["backward_us"] is not None:
        print(f"  backward {mean['backward_us']:.1f} us predicted, bound {mean['backward_bound_us']:.1f} us")
    return 0
