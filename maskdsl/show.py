"""Draw which keys a few queries see, on the token grid, so a mask can be looked at.

1-D layouts: one row per chosen query over the key axis. 2-D: one panel per query.
3-D: for each query, 2-D slices (dims 1 x 2) at the query's own frame and at the first and
last frames it sees. Only the chosen rows of the mask are built (maskdsl.harness.semantics rows=).
"""

from __future__ import annotations

import torch

from maskdsl.spec import ir
from maskdsl.harness.semantics import static_mask


def default_queries(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Corner, centre, and an edge point: where clamping and strides show."""
    centre = tuple(n // 2 for n in shape)
    edge = tuple(n - 1 if d == len(shape) - 1 else n // 2 for d, n in enumerate(shape))
    corner = tuple(0 for _ in shape)
    out = []
    for q in (corner, centre, edge):
        if q not in out:
            out.append(q)
    return out


def _flat(coord, shape) -> int:
    idx = 0
    for c, n in zip(coord, shape):
        idx = idx * n + c
    return idx


def draw(mask: ir.MaskDef, out_path: str, queries: list[tuple[int, ...]] | None = None) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # optional dependency
        raise RuntimeError("`maskdsl show` needs matplotlib: pip install 'maskdsl[show]'") from exc
    if mask.dynamic:
        raise ValueError(f"mask {mask.name!r} depends on the data (top-k); show draws static masks")
    shape = mask.layout.shape
    queries = queries or default_queries(shape)
    for q in queries:
        if len(q) != len(shape) or any(not 0 <= c < n for c, n in zip(q, shape)):
            raise ValueError(f"query {q} is outside the grid {shape}")
    rows = static_mask(mask.expr, shape, torch.tensor([_flat(q, shape) for q in queries]))
    if len(shape) == 1:
        fig, ax = plt.subplots(figsize=(10, 0.6 * len(queries) + 1))
        ax.imshow(rows.numpy(), aspect="auto", cmap="Blues", interpolation="nearest")
        ax.set_yticks(range(len(queries)), [f"query {q[0]}" for q in queries])
        ax.set_xlabel("key")
    else:
        panels = []
        for q, row in zip(queries, rows):
            grid = row.view(*shape)
            if len(shape) == 2:
                panels.append((f"query {q}", grid, q))
            else:
                frames = torch.nonzero(grid.flatten(1).any(1)).flatten().tolist() or [q[0]]
                for f in sorted({frames[0], q[0], frames[-1]}):
                    panels.append((f"query {q}, key frame {f}", grid[f], q if f == q[0] else None))
        cols = min(3, len(panels))
        nrows = (len(panels) + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.6 * nrows), squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.axis("off")
        for ax, (title, grid, q) in zip(axes.flat, panels):
            ax.imshow(grid.numpy(), cmap="Blues", interpolation="nearest", vmin=0, vmax=1)
            if q is not None:
                ax.plot(q[-1], q[-2], "r*", markersize=10)
            ax.set_title(title, fontsize=9)
    fig.suptitle(f"{mask.name} = {mask.expr.fmt()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
