"""The typed IR of a mask spec: frozen, hashable dataclasses with one canonical text form.

Every parameter is stored fully broadcast (one entry per layout dimension), so two specs
that mean the same mask compare equal whatever sugar the user wrote. The canonical text
(`fmt`) is what the content hash is taken over: it keys the kernel cache and the tuning
database, so it must never depend on names, comments, whitespace or file positions.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Union

IntTuple = tuple[int, ...]
BoolTuple = tuple[bool, ...]


@dataclass(frozen=True)
class Layout:
    """A row-major token grid; `shape[-1]` varies fastest in the flattened token order."""

    name: str
    shape: IntTuple

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def tokens(self) -> int:
        return math.prod(self.shape)

    def fmt(self) -> str:
        return f"layout {self.name} = grid({', '.join(map(str, self.shape))})"


@dataclass(frozen=True)
class Neighborhood:
    """NATTEN/GNA neighborhood attention, per dimension (see maskdsl.harness.semantics)."""

    window: IntTuple
    dilation: IntTuple
    stride: IntTuple
    causal: BoolTuple

    def fmt(self) -> str:
        parts = [f"window={_fmt_tuple(self.window)}"]
        if any(d != 1 for d in self.dilation):
            parts.append(f"dilation={_fmt_tuple(self.dilation)}")
        if any(s != 1 for s in self.stride):
            parts.append(f"stride={_fmt_tuple(self.stride)}")
        if any(self.causal):
            parts.append(f"causal={_fmt_tuple(self.causal)}")
        return f"neighborhood({', '.join(parts)})"


@dataclass(frozen=True)
class Causal:
    """Causal over the flattened row-major token order: key j is seen by query i iff j <= i."""

    def fmt(self) -> str:
        return "causal"


@dataclass(frozen=True)
class Full:
    """Every query sees every key (dense attention)."""

    def fmt(self) -> str:
        return "full"


@dataclass(frozen=True)
class Sink:
    """Global tokens: the first `n` tokens (row-major order) see every key and are seen by every query."""

    n: int

    def fmt(self) -> str:
        return f"sink({self.n})"


@dataclass(frozen=True)
class TopK:
    """Data-dependent block selection: each query block keeps its `k` best-scoring key blocks.

    A block is a box of the grid, `block[d]` tokens along dimension d (maskdsl.harness.topk); an int is
    the 1-D shorthand for `(int,)`.
    """

    k: int
    block: IntTuple

    def __post_init__(self):
        if isinstance(self.block, int):
            object.__setattr__(self, "block", (self.block,))

    @property
    def volume(self) -> int:
        """Tokens in a whole block (the last block along a dimension may be cut by the grid)."""
        return math.prod(self.block)

    def fmt(self) -> str:
        return f"topk(k={self.k}, block={_fmt_tuple(self.block)})"


@dataclass(frozen=True)
class Document:
    """Attention stays inside the query's own document; the boundaries come with each call (offsets).

    Only as a term of the mask's top-level intersection: `document & X` evaluates X in the document's
    own coordinates (maskdsl.spec.documents states the rule, maskdsl.harness.documents is its oracle).
    """

    def fmt(self) -> str:
        return "document"


@dataclass(frozen=True)
class Prefix:
    """Inside `document & ...` only: the keys of the document's prefix, whose length comes with each call."""

    def fmt(self) -> str:
        return "prefix"


@dataclass(frozen=True)
class Union_:
    """A key is seen if any term sees it. Terms are flattened (no nested unions)."""

    terms: tuple["MaskExpr", ...]

    def fmt(self) -> str:
        return " | ".join(_fmt_operand(t, Union_) for t in self.terms)


@dataclass(frozen=True)
class Intersection:
    """A key is seen if every term sees it. Terms are flattened (no nested intersections)."""

    terms: tuple["MaskExpr", ...]

    def fmt(self) -> str:
        return " & ".join(_fmt_operand(t, Intersection) for t in self.terms)


MaskExpr = Union[Neighborhood, Causal, Full, Sink, TopK, Document, Prefix, Union_, Intersection]
PRIMITIVES = (Neighborhood, Causal, Full, Sink, TopK, Document, Prefix)


def union(*terms: MaskExpr) -> MaskExpr:
    return _combine(Union_, terms)


def intersection(*terms: MaskExpr) -> MaskExpr:
    return _combine(Intersection, terms)


def _combine(cls, terms):
    flat: list = []
    for t in terms:
        flat.extend(t.terms if isinstance(t, cls) else (t,))
    return flat[0] if len(flat) == 1 else cls(tuple(flat))


def walk(expr: MaskExpr):
    """Every node of the expression, parents first."""
    yield expr
    if isinstance(expr, (Union_, Intersection)):
        for t in expr.terms:
            yield from walk(t)


def is_dynamic(expr: MaskExpr) -> bool:
    return any(isinstance(node, TopK) for node in walk(expr))


def has_documents(expr: MaskExpr) -> bool:
    """Whether the mask's shape arrives with each call (`document` or `prefix` in it)."""
    return any(isinstance(node, (Document, Prefix)) for node in walk(expr))


@dataclass(frozen=True)
class MaskDef:
    name: str
    expr: MaskExpr
    layout: Layout

    @property
    def dynamic(self) -> bool:
        return is_dynamic(self.expr)

    @property
    def documents(self) -> bool:
        """Whether calls pass document offsets (maskdsl.spec.documents)."""
        return has_documents(self.expr)

    def fmt(self) -> str:
        return f"mask {self.name} = {self.expr.fmt()} on {self.layout.name}"

    def content_hash(self) -> str:
        """Hash of what the mask computes (grid shape + canonical expression), not of its name."""
        text = f"grid({', '.join(map(str, self.layout.shape))}) :: {self.expr.fmt()}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# The spec's dtype names, each with the torch dtype it runs as (by name: the spec floor does not import
# torch) and its bytes per element. The kernels take exactly these.
TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
SPEC_DTYPES = tuple(TORCH_DTYPE_NAMES)
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class Attention:
    """The problem a mask will run on: what autotuning and benchmarks size themselves by."""

    name: str
    mask: str
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    batch: int

    def fmt(self) -> str:
        return (
            f"attention {self.name}(mask={self.mask}, heads={self.heads}, kv_heads={self.kv_heads}, "
            f"head_dim={self.head_dim}, dtype={self.dtype}, batch={self.batch})"
        )


@dataclass(frozen=True)
class Spec:
    layouts: tuple[Layout, ...]
    masks: tuple[MaskDef, ...]
    attentions: tuple[Attention, ...] = ()

    def mask(self, name: str) -> MaskDef:
        for m in self.masks:
            if m.name == name:
                return m
        from maskdsl.spec.errors import suggest

        known = [m.name for m in self.masks]
        raise KeyError(f"no mask named {name!r} in the spec{suggest(name, known)}; masks: {', '.join(known) or 'none'}")

    def attention_for(self, mask_name: str) -> Attention | None:
        for a in self.attentions:
            if a.mask == mask_name:
                return a
        return None

    def fmt(self) -> str:
        lines = [lay.fmt() for lay in self.layouts]
        lines += [m.fmt() for m in self.masks]
        lines += [a.fmt() for a in self.attentions]
        return "\n".join(lines) + "\n"

    def content_hash(self) -> str:
        return hashlib.sha256(self.fmt().encode()).hexdigest()[:16]


def _fmt_scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _fmt_tuple(values: tuple) -> str:
    """Scalars broadcast, so an all-equal tuple prints as one scalar (the canonical form)."""
    if len(set(values)) == 1:
        return _fmt_scalar(values[0])
    return "(" + ", ".join(_fmt_scalar(v) for v in values) + ")"


def _fmt_operand(term: MaskExpr, parent: type) -> str:
    # `&` binds tighter than `|`, so only a union inside an intersection needs parentheses.
    if isinstance(term, Union_) and parent is Intersection:
        return f"({term.fmt()})"
    return term.fmt()
