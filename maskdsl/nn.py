"""`maskdsl.nn.MaskedAttention`: a compiled mask as an nn.Module (no parameters of its own).

It compiles once at construction through the front door (`maskdsl.api.compile`: tuned config,
else the default), so a forward pass does no mask work at all for static masks.
"""

from __future__ import annotations

import torch


class MaskedAttention(torch.nn.Module):
    """softmax(q k^T * scale, masked) v for q [B, H, L, D] and k, v [B, H_kv, L, D] (row-major tokens)."""

    def __init__(self, spec, mask: str, config=None, scale: float | None = None, backward_config=None,
                 deterministic: bool | None = None):
        super().__init__()
        from maskdsl.api import compile

        self.attention = compile(spec, mask, config, backward_config, deterministic=deterministic)
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **documents) -> torch.Tensor:
        """`documents=offsets` (and `prefix=`, `check_documents=`) go to a document mask's call (docs/LANGUAGE.md)."""
        return self.attention(q, k, v, scale=self.scale, **documents)

    def extra_repr(self) -> str:
        m = self.attention.mask
        return f"mask={m.name}: {m.expr.fmt()} on grid{m.layout.shape}, config={self.attention.config.key()}"
