"""Where maskdsl keeps its files: one root for rendered kernels, the tuning database and fitted costs.

One function so that `MASKDSL_CACHE_DIR` moves all of them together (tests point it at a temporary
folder; a cluster job points it at shared storage) and no part guesses the others' location.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$MASKDSL_CACHE_DIR`, else `$XDG_CACHE_HOME/maskdsl`, else `~/.cache/maskdsl` (not created here)."""
    root = os.environ.get("MASKDSL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "maskdsl")
    return Path(root)
