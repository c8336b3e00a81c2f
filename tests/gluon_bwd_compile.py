"""Compile codegen.gluon_bwd for sm_90 without a GPU and print ptxas' report as JSON (test_gluon_bwd runs it).

A separate process for the reason tests/gluon_compile.py gives (the interpreter's builtins).

Usage:
  python tests/gluon_bwd_compile.py HEAD_DIM [1d|3d] [--gqa] [--fp16] [--stages N] [--writer-warps N] [--pingpong]
"""

import json
import re
import sys

import torch
from triton.runtime import driver

from maskdsl.codegen import gluon_bwd
from gluon_compile import Sm90Driver, ptxas

# (grid, query tile, key tile, key table rows, visit table rows): a 1-D order with two key tiles each
# visited by both query tiles, and a 3-D grid's boxes
SHAPES = {
    "1d": ((1, 1, 256), (1, 1, 128), (1, 1, 128), [[0, 0, 0, 0, 2], [0, 0, 1, 2, 4]],
           [[0, 0, 0], [0, 0, 1], [0, 0, 0], [0, 0, 1]]),
    "3d": ((4, 16, 16), (2, 8, 8), (1, 8, 16), [[0, 0, 0, 0, 2], [1, 1, 0, 2, 3]], [[0, 0, 0], [0, 1, 1], [1, 1, 1]]),
}


def compile_kernel(head_dim: int, shape: str = "1d", gqa: bool = False, dtype=torch.bfloat16, stages: int = 2,
                   writer_warps: int = 1, pingpong: bool = False):
    grid, q_tile, kv_tile, keys, visits = SHAPES[shape]
    tokens = grid[0] * grid[1] * grid[2]
    q = torch.zeros(1, 4, tokens, head_dim, dtype=dtype)
    kv = torch.zeros(1, 2 if gqa else 4, tokens, head_dim, dtype=dtype)
    f32 = torch.zeros(1, 4, tokens, head_dim)
    part = f32 if gqa else torch.zeros_like(q)
    lse = torch.zeros(1, 4, tokens)
    launch_grid, args, kwargs = gluon_bwd.kernel_args(
        q, kv, kv, q, lse, lse, f32, part, part, 0.1, torch.tensor(keys, dtype=torch.int32),
        torch.tensor(visits, dtype=torch.int32), grid, q_tile, kv_tile, stages, writer_warps, pingpong)
    driver.set_active(Sm90Driver())
    return gluon_bwd.attention_bwd.warmup(*args, grid=launch_grid, **kwargs)


def compile_delta(head_dim: int, dtype=torch.bfloat16):
    t = torch.zeros(256, head_dim, dtype=dtype)
    driver.set_active(Sm90Driver())
    return gluon_bwd.attention_bwd_delta.warmup(t, t, torch.zeros(256), 256, HEAD_D=head_dim,
                                                BLOCK=gluon_bwd.DELTA_BLOCK, num_warps=4, grid=(4,))


def report(kernel) -> dict:
    ptx = kernel.asm["ptx"]
    text, _ = ptxas(ptx)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", text)]
    setmaxnreg = {" ".join(m) for m in re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx)}
    atomics = sorted(set(re.findall(r"\b(red\.[\w.]+|atom\.[\w.]+)", ptx)))
    return {"spill_stores": int(spills[1]) if spills else None, "spill_loads": int(spills[2]) if spills else None,
            "registers": regs, "shared": kernel.metadata.shared, "setmaxnreg": sorted(setmaxnreg),
            "atomics": atomics, "report": text}


def main(argv) -> dict:
    def option(name, default):
        return int(argv[argv.index(name) + 1]) if name in argv else default

    stages, writers = option("--stages", 2), option("--writer-warps", 1)
    args = [a for i, a in enumerate(argv) if not a.startswith("--") and (i == 0 or not argv[i - 1].startswith("--s")
                                                                          and not argv[i - 1].startswith("--w"))]
    dtype = torch.float16 if "--fp16" in argv else torch.bfloat16
    out = report(compile_kernel(int(args[0]), args[1] if len(args) > 1 else "1d", "--gqa" in argv, dtype, stages,
                                writers, "--pingpong" in argv))
    out["delta"] = {k: v for k, v in report(compile_delta(int(args[0]), dtype)).items() if k != "report"}
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
