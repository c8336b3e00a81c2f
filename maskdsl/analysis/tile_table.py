"""The table contract: how every kernel that reads a tile schedule from memory finds its columns.

A kernel that walks a mask's tiles from a table (the Gluon forward in each of its modes, the Triton
backward's per-dimension tables, and whatever reads the transposed schedule next) reads the
columns by these names, and every producer writes them by these names, so neither side counts
offsets by hand and the mode is stated, not inferred from a width.

Row tables (one int32 row per busy query tile, in dispatch order; grids padded to `RANK`
dimensions at the front):

    COORD + d           query-tile coordinate in dimension d
    BOX + 2 d, + 1      key tiles [lo, hi) visited in dimension d (a run of key tiles on 1-D orders)
    FULL + 2 d, + 1     "boxes" only: key tiles [lo, hi) every row of the query tile sees whole in d
    RUN2, RUN2 + 1      "runs" only: the second run of key tiles [lo, hi) (the first is BOX's last d)
    FLAG                "runs" only: 1 when every tile of the query tile is masked

Per-dimension range tables (`maskdsl.analysis.transpose`; [..., tiles, RANGE]): for a tile of one kind, the
tiles of the other kind it visits [A, B] and those it sees whole [FA, FB], inclusive (B < A: none).
"""

from __future__ import annotations

RANK = 3  # dimensions of the row tables: smaller grids get leading dimensions of extent 1

COORD = 0
BOX = COORD + RANK
FULL = BOX + 2 * RANK  # "boxes"
RUN2 = BOX + 2 * RANK  # "runs"
FLAG = RUN2 + 2  # "runs"

MODES = ("whole", "runs", "boxes")
PREDICATED = ("runs", "boxes")  # the modes that mask some tiles
WIDTH = {"whole": BOX + 2 * RANK, "runs": FLAG + 1, "boxes": FULL + 2 * RANK}

# per-dimension range tables: [A, B] visited, [FA, FB] seen whole, inclusive
A, B, FA, FB = 0, 1, 2, 3
RANGE = 4


def box_lo(d: int) -> int:
    """Column of the first key tile visited in dimension d."""
    return BOX + 2 * d


def box_hi(d: int) -> int:
    """Column one past the last key tile visited in dimension d."""
    return BOX + 2 * d + 1


def full_lo(d: int) -> int:
    """Column of the first key tile seen whole in dimension d ("boxes")."""
    return FULL + 2 * d


def full_hi(d: int) -> int:
    """Column one past the last key tile seen whole in dimension d ("boxes")."""
    return FULL + 2 * d + 1


def mode_of_width(width: int) -> str:
    """The mode a row table of this width belongs to (a check on tables handed in from outside)."""
    for mode, w in WIDTH.items():
        if w == width:
            return mode
    raise ValueError(f"a tile table has {width} columns; the modes have {WIDTH}")
