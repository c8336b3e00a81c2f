"""What the language accepts in size, and why each bound sits where it does (docs/LIMITS.md).

Every bound here is checked when a spec is parsed (and when a Spec built in Python is validated,
maskdsl.lang.validate), so that whatever is accepted can be analysed, simulated and compiled in bounded
time and memory; nothing later fails on size with a raw Python error.
"""

from __future__ import annotations

SPEC_HEAD_DIMS = tuple(range(16, 257, 8))
"""The head_dims a spec may name: every multiple of 8 from 16 to 256 (72, 80, 96, 192 occur in real
models; 8 keeps 16-byte rows for 2-byte dtypes). The static kernels run them padded to a power of two
(`padded_head_dim`)."""

POW2_HEAD_DIMS = tuple(d for d in SPEC_HEAD_DIMS if d & (d - 1) == 0)
"""The head_dims a kernel that does not pad takes: the powers of two among SPEC_HEAD_DIMS (16 to 256)."""


def padded_head_dim(head_dim: int) -> int:
    """The power of two a kernel's tiles are for `head_dim` (HEAD_DIM_PAD), at least 16: the columns past
    head_dim are masked off in every load and store, so the inputs are never copied and the output is
    exact; head_dim 96 runs 128-column tiles and costs 128's work."""
    return max(16, 1 << (int(head_dim) - 1).bit_length())


MAX_INT = 2**63 - 1
"""Largest integer literal: every count a kernel takes fits a signed 64-bit integer."""

MAX_TOKENS = 2**31 - 1
"""Largest grid (tokens per sequence): the kernels index tokens with 32-bit integers."""

MAX_EXTENT = 2**22
"""Largest extent of one dimension (4,194,304). The exact analysis evaluates each dimension's key
interval at every coordinate of that dimension (O(extent) time and memory per dimension); at this
bound `maskdsl check` of a 1-D causal window with sinks takes about 3 s and 0.6 GB."""

MAX_DEPTH = 64
"""Deepest nesting of a mask expression (each `|` or `&` is a level; the parser reads `a | b | c` as
`(a | b) | c`), checked on the text and again on the mask with its named masks inlined, which is what
`fmt` prints: whatever parses prints a text that parses. Parenthesised values nest at most as deep."""

MAX_LEAVES = 1024
"""Most primitives a mask may hold once the named masks it uses are inlined. Naming lets a short text
reuse a mask many times (`mask b = a & a`, `mask c = b & b`, ...): each doubling costs one line of
text, so without this bound thirty lines would print, hash and walk a billion-primitive expression."""

MAX_PRODUCTS = 12
"""Most product terms a mask may expand to (maskdsl.analysis.counts: a neighborhood or `full` is one term,
`causal` one per dimension, `sink(n)` up to two per dimension; `&` distributes over `|`, empty
intersections and terms inside others are dropped). Exact counting of a union is inclusion-exclusion
over the overlapping subsets of its terms: at most 2**12 - 1 = 4095 intersections, each numeric and
O(extent) per dimension."""


MAX_EVALUATED = 2**24
"""Most coordinates the exact analysis evaluates primitives at: a mask of P primitives on a grid whose
extents sum to E is refused unless P * E is at most this (each primitive is evaluated at every
coordinate of each dimension, and terms are compared coordinate by coordinate). At the bound a
parse takes about 5 s and 0.7 GB: four primitives at the largest extent, 64 on a 512 x 512 grid."""

MAX_INTERSECTED = 2**25
"""Most coordinates inclusion-exclusion may visit: T product terms on extents summing to E are refused
unless 2**T * E is at most this (up to 2**T - 1 intersections of O(E) each). It admits the 12 terms
up to E = 8,192 (4096 x 4096) and a causal window with a sink (3 terms) at the largest extent."""


def work_problem(primitives: int, terms: int | None, shape: tuple[int, ...]) -> str | None:
    """Why a mask is too much work to analyse exactly (MAX_EVALUATED, MAX_INTERSECTED), else None;
    `terms` is None before the mask is expanded (the primitives' bound is checked first: it is that work)."""
    extent = sum(shape)
    if primitives * extent > MAX_EVALUATED:
        return (f"{primitives} primitives on a grid whose extents sum to {extent:,} are {primitives * extent:,} "
                f"coordinates to evaluate, more than the {MAX_EVALUATED:,} the exact analysis is bounded to")
    if terms is not None and 2**terms * extent > MAX_INTERSECTED:
        return (f"{terms} product terms on a grid whose extents sum to {extent:,} need up to {2**terms - 1:,} "
                f"intersections of {extent:,} coordinates each, more than the {MAX_INTERSECTED:,} coordinates "
                "the exact analysis is bounded to")
    return None


def shape_problem(shape: tuple[int, ...]) -> tuple[str, int | None, str] | None:
    """(reason, offending dimension or None for the whole grid, hint), else None. Extents are >= 1 here."""
    for d, n in enumerate(shape):
        if n > MAX_EXTENT:
            return (f"grid extent {n} is larger than {MAX_EXTENT:,}, the largest extent of one dimension",
                    d, "the exact analysis works per coordinate of each dimension; split it into more dimensions "
                    "if the mask allows, see docs/LIMITS.md")
    tokens = 1
    for n in shape:
        tokens *= n
    if tokens > MAX_TOKENS:
        return (f"grid{tuple(shape)} has {tokens:,} tokens, more than {MAX_TOKENS:,} (2^31 - 1)", None,
                "the kernels index tokens with 32-bit integers; a sequence this long cannot run")
    return None
