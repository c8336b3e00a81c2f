"""Masks over packed documents: the normal form every layer reads (kernels, simulator, docs).

`document & X` on a layout of T frames (its dimension 0; on a 1-D layout a frame is a token): the call
passes offsets [0, f1, f1 + f2, ..., T] in frames (cu_seqlens), so a document is a run of whole frames,
a query sees only keys of its own document, and X is evaluated in the document's own coordinates (a
frame's index minus its document's first frame, the document's frames the extent of dimension 0; the
other dimensions as they are). So `causal` is causal over the document's tokens, a window along
dimension 0 clamps to the document's frames (and sees all of them when it is wider), `sink(n)` is each
document's first n tokens, and `prefix` is the keys of the document's prefix, whose length in tokens per
document comes with the call. On a grid a neighborhood inside documents must span dimensions 1.. whole
(window = extent, not causal): block-causal or windowed attention over frames, full within a frame.

The normal form writes X as a union of `DocTerm`s, each an intersection of atoms, so that every row's
keys under one term are one interval of tokens of its document, and every key's queries under one term
are one interval too (`row_interval`, `column_interval`, the closed forms the kernels evaluate on the
device). What does not fit it is refused with a sentence and the primitive to point at (`DocumentProblem`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import product

from maskdsl.spec import ir

MAX_TERMS = 4  # terms of one document mask: the kernels unroll them (constexpr), each a few integer ops per row


class DocumentProblem(ValueError):
    """A document mask outside the supported form: `primitive` names the keyword to point the error at."""

    def __init__(self, message: str, primitive: str, hint: str):
        super().__init__(message)
        self.primitive, self.hint = primitive, hint


@dataclass(frozen=True)
class DocTerm:
    """One intersection of atoms: per row, keys [lo, hi) of its document (0 means the atom is absent).

    causal: keys up to the query (tokens); window_causal w: keys of the last w frames up to the query's
    frame; window w: the NATTEN window of w frames clamped to the document's frames (all of them when w
    exceeds their number); prefix: the document's prefix keys; sink_keys n: its first n keys (tokens);
    sink_queries n: only its first n queries take part. On a 1-D layout a frame is a token.
    """

    causal: bool = False
    window_causal: int = 0
    window: int = 0
    prefix: bool = False
    sink_keys: int = 0
    sink_queries: int = 0

    def as_tuple(self) -> tuple[int, ...]:
        """The kernels' constexpr encoding, in field order."""
        return (int(self.causal), self.window_causal, self.window, int(self.prefix), self.sink_keys, self.sink_queries)


@dataclass(frozen=True)
class DocumentForm:
    terms: tuple[DocTerm, ...]

    @property
    def uses_prefix(self) -> bool:
        return any(t.prefix for t in self.terms)


def document_form(expr: ir.MaskExpr, shape: tuple[int, ...] | None = None) -> DocumentForm:
    """The normal form of a mask holding `document` on a layout of this shape (None: 1-D); DocumentProblem
    where it has none."""
    shape = tuple(shape) if shape is not None else None
    parts = expr.terms if isinstance(expr, ir.Intersection) else (expr,)
    docs = [p for p in parts if isinstance(p, ir.Document)]
    if not docs:
        if ir.has_documents(expr):
            where = "prefix" if not any(isinstance(n, ir.Document) for n in ir.walk(expr)) else "document"
            if where == "prefix":
                raise DocumentProblem("`prefix` is only meaningful inside documents", "prefix",
                                      "write `document & (causal | prefix)`")
            raise DocumentProblem("`document` must be a term of the mask's top-level intersection", "document",
                                  "write `document & (...)` with the rest of the mask in the parentheses")
        raise DocumentProblem("the mask has no `document` term", "document", "write `document & (...)`")
    inner = [p for p in parts if not isinstance(p, ir.Document)]
    terms = [DocTerm()]
    for part in inner:
        terms = [_merge(a, b) for a, b in product(terms, _terms(part, shape))]
    unique = tuple(dict.fromkeys(terms))
    if len(unique) > MAX_TERMS:
        raise DocumentProblem(f"inside documents the mask expands to {len(unique)} terms (intersections distributed "
                              f"over unions, each sink(n) two terms), more than {MAX_TERMS}", "document",
                              "combine fewer unions inside `document & (...)`")
    return DocumentForm(unique)


def _terms(expr: ir.MaskExpr, shape) -> list[DocTerm]:
    if isinstance(expr, ir.Full):
        return [DocTerm()]
    if isinstance(expr, ir.Causal):
        return [DocTerm(causal=True)]
    if isinstance(expr, ir.Prefix):
        return [DocTerm(prefix=True)]
    if isinstance(expr, ir.Sink):
        return [DocTerm(sink_keys=expr.n), DocTerm(sink_queries=expr.n)]  # (key < n) | (query < n)
    if isinstance(expr, ir.Neighborhood):
        if any(d != 1 for d in expr.dilation) or any(s != 1 for s in expr.stride):
            name = "dilated" if any(d != 1 for d in expr.dilation) else "strided"
            raise DocumentProblem(f"a {name} neighborhood inside documents is not supported", "neighborhood"
                                  if name == "dilated" else "strided",
                                  "inside `document & (...)` use sliding_window(w) or sliding_window(w, causal=true)")
        for d in range(1, len(expr.window)):
            if expr.causal[d] or shape is None or expr.window[d] != shape[d]:
                raise DocumentProblem(f"inside documents on a grid a neighborhood must span dimension {d} whole "
                                      f"(window {shape[d] if shape else '?'}, not causal); got window "
                                      f"{expr.window[d]}{', causal' if expr.causal[d] else ''}", "neighborhood",
                                      "documents are runs of whole frames: windows along dimension 0 (frames) are "
                                      "supported, windows inside a frame not yet (docs/LIMITS.md)")
        w = expr.window[0]
        return [DocTerm(window_causal=w)] if expr.causal[0] else [DocTerm(window=w)]
    if isinstance(expr, ir.TopK):
        raise DocumentProblem("top-k selection with documents is not supported", "topk",
                              "use a static mask inside `document & (...)`")
    if isinstance(expr, ir.Document):
        raise DocumentProblem("`document` must be a term of the mask's top-level intersection, not nested",
                              "document", "write `document & (...)` once, at the top")
    if isinstance(expr, ir.Union_):
        return [t for part in expr.terms for t in _terms(part, shape)]
    if isinstance(expr, ir.Intersection):
        terms = [DocTerm()]
        for part in expr.terms:
            terms = [_merge(a, b) for a, b in product(terms, _terms(part, shape))]
        return terms
    raise TypeError(f"not a mask expression: {expr!r}")


def _smaller(a: int, b: int) -> int:
    return min(x for x in (a, b) if x) if (a or b) else 0


def _merge(a: DocTerm, b: DocTerm) -> DocTerm:
    """a & b as one term: each field keeps the tighter bound."""
    if a.window and b.window and a.window != b.window:
        raise DocumentProblem(f"two different non-causal windows ({a.window} and {b.window}) intersected inside "
                              "documents are not one window", "sliding_window", "use one window per term")
    merged = DocTerm(causal=a.causal or b.causal, window_causal=_smaller(a.window_causal, b.window_causal),
                     window=a.window or b.window, prefix=a.prefix or b.prefix,
                     sink_keys=_smaller(a.sink_keys, b.sink_keys),
                     sink_queries=_smaller(a.sink_queries, b.sink_queries))
    if merged.window_causal:  # a causal window is causal already
        merged = replace(merged, causal=False)
    return merged


def row_interval(term: DocTerm, i: int, start: int, end: int, prefix: int = 0, inner: int = 1) -> tuple[int, int]:
    """Keys [lo, hi) that query token i of the document of tokens [start, end) sees under `term` (empty when
    hi <= lo); `inner` tokens per frame (start and end are whole frames).

    The rule the kernels evaluate per row (codegen.documents): one home, in plain integers.
    """
    lo, hi = start, end
    if term.causal:
        hi = min(hi, i + 1)
    fi, fs, fe = i // inner, start // inner, end // inner
    if term.window_causal:
        lo, hi = max(lo, (fi - term.window_causal + 1) * inner), min(hi, (fi + 1) * inner)
    if term.window:
        n = fe - fs
        w = min(term.window, n)
        first = fs + min(max(fi - fs - w // 2, 0), n - w)
        lo, hi = max(lo, first * inner), min(hi, (first + w) * inner)
    if term.prefix:
        hi = min(hi, start + max(prefix, 0))
    if term.sink_keys:
        hi = min(hi, start + term.sink_keys)
    if term.sink_queries and i - start >= term.sink_queries:
        hi = lo
    return lo, hi


def column_interval(term: DocTerm, j: int, start: int, end: int, prefix: int = 0, inner: int = 1) -> tuple[int, int]:
    """Query tokens [lo, hi) of the document [start, end) that see key token j under `term`: the transpose of
    `row_interval` (the backward's dK/dV programs walk it)."""
    lo, hi = start, end
    if term.causal:
        lo = max(lo, j)
    fj, fs, fe = j // inner, start // inner, end // inner
    if term.window_causal:
        lo, hi = max(lo, fj * inner), min(hi, (fj + term.window_causal) * inner)
    if term.window:
        # the window's first frame is clamp(f - w//2, fs, fe - w), non-decreasing in the query's frame f:
        # solve first <= fj < first + w
        w = min(term.window, fe - fs)
        h = w // 2
        lo = max(lo, start if fj - w < fs else (fj - w + h + 1) * inner)
        hi = min(hi, end if fj >= fe - w else (fj + h + 1) * inner)
    if term.prefix and j - start >= max(prefix, 0):
        hi = lo
    if term.sink_keys and j - start >= term.sink_keys:
        hi = lo
    if term.sink_queries:
        hi = min(hi, start + term.sink_queries)
    return lo, hi


def draw_offsets(total: int, low: int, high: int, rng) -> list[int]:
    """Offsets [0, ..., total] of documents with lengths drawn uniformly in [low, high] (`rng`: a
    random.Random), the last one cut to end at `total`: a packed sequence as a data loader builds it."""
    if not 1 <= low <= high:
        raise ValueError(f"document lengths need 1 <= low <= high, got [{low}, {high}]")
    offsets = [0]
    while offsets[-1] < total:
        offsets.append(min(total, offsets[-1] + rng.randint(low, high)))
    return offsets
