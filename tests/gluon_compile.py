"""Compile codegen.gluon_fwd for sm_90 without a GPU and print ptxas' report as JSON (test_gluon runs it).

A separate process because Triton's language builtins are bound to its interpreter when
TRITON_INTERPRET=1 is set at import (as the test suite does), and Gluon cannot compile those.
Usage: python tests/gluon_compile.py HEAD_DIM [1d|3d|1d-masked|3d-box][-items]
(-items: two work items per program, the short-item schedule of codegen.gluon_plan.items_per_program)
"""

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.runtime import driver

from maskdsl.codegen import gluon_fwd

TARGET = GPUTarget("cuda", 90, 32)


class Sm90Driver:
    """What the JIT's warmup asks of a driver (a device, a stream, a target); nothing launches."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET

    def get_active_torch_device(self):
        return torch.device("cpu")


# (grid, query tile, key tile, table rows, predicate terms): a 1-D token order, a 3-D grid's boxes, and
# 1-D with two runs per query tile and the edge tiles' predicate over two terms (codegen.gluon_runs)
SHAPES = {
    "1d": ((1, 1, 256), (1, 1, 128), (1, 1, 128), [[0, 0, 0, 0, 1, 0, 1, 0, 2], [0, 0, 1, 0, 1, 0, 1, 0, 1]], 0),
    "3d": ((4, 16, 16), (2, 8, 8), (1, 8, 16), [[0, 0, 0, 0, 2, 0, 2, 0, 1], [1, 1, 1, 2, 4, 1, 2, 0, 1]], 0),
    "1d-masked": ((1, 1, 300), (1, 1, 128), (1, 1, 128),
                  [[0, 0, 0, 0, 1, 0, 1, 0, 1, 0, 0, 1], [0, 0, 2, 0, 1, 0, 1, 0, 1, 1, 3, 0]], 2),
    # a ragged 3-D grid with the per-dimension predicate (codegen.gluon_boxes): rows end in the full box
    "3d-box": ((5, 12, 20), (2, 4, 16), (2, 8, 8), [[0, 0, 0, 0, 2, 0, 2, 0, 3, 0, 1, 0, 1, 1, 2],
                                                   [2, 2, 1, 1, 3, 0, 2, 1, 3, 1, 3, 0, 0, 0, 0]], "box"),
}


def main(head_dim: int, shape: str = "1d") -> dict:
    per = 2 if shape.endswith("-items") else 1
    grid, q_tile, kv_tile, rows, terms = SHAPES[shape.removesuffix("-items")]
    tokens = grid[0] * grid[1] * grid[2]
    q = torch.zeros(1, 4, tokens, head_dim, dtype=torch.bfloat16)
    kv = torch.zeros(1, 2, tokens, head_dim, dtype=torch.bfloat16)  # GQA: two query heads per kv head
    table = torch.tensor(rows, dtype=torch.int32)
    if terms == "box":
        bounds = torch.zeros(2 * sum(grid), dtype=torch.int32)
    else:
        bounds = torch.zeros(terms, 2, tokens, dtype=torch.int32) if terms else None
    grid, args, kwargs = gluon_fwd.kernel_args(q, kv, kv, torch.empty_like(q), torch.empty(1, 4, tokens), 0.1,
                                               table, 0, 2, grid, q_tile, kv_tile, bounds=bounds, per=per)
    driver.set_active(Sm90Driver())
    kernel = gluon_fwd.attention_fwd.warmup(*args, grid=grid, **kwargs)  # the real binder and compiler
    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", f"{tmp}/k.ptx", "-o", f"{tmp}/k.o"],
                             capture_output=True, text=True, check=True)
    report = log.stdout + log.stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    setmaxnreg = {" ".join(m) for m in re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx)}
    return {"spill_stores": int(spills[1]) if spills else None, "spill_loads": int(spills[2]) if spills else None,
            "shared": kernel.metadata.shared, "setmaxnreg": sorted(setmaxnreg), "report": report}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), *sys.argv[2:])))
