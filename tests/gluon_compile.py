"""Compile codegen.gluon_fwd for sm_90 without a GPU and print ptxas' report as JSON (test_gluon runs it).

A separate process because Triton's language builtins are bound to its interpreter when
TRITON_INTERPRET=1 is set at import (as the test suite does), and Gluon cannot compile those.

Usage:
  python tests/gluon_compile.py HEAD_DIM [1d|3d|1d-masked|3d-box][-items] [--no-pingpong]
      (-items: two work items per program, the short-item schedule of codegen.gluon_plan.items_per_program)
  python tests/gluon_compile.py --against OLD.py [OUT.json [SHAPE,...]]
      every shape, head_dim and ping-pong setting compiled from OLD.py (an earlier codegen/gluon_fwd.py,
      e.g. `git show REV:codegen/gluon_fwd.py > OLD.py`) and from the package: PTX and SASS instruction
      counts side by side, and which SASS opcodes differ in count. A restructuring that leaves the
      kernel alone leaves them equal.
"""

import collections
import importlib.util
import inspect
import itertools
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


# (grid, query tile, key tile, table rows, mode, predicate terms): a 1-D token order, a 3-D grid's boxes, and
# 1-D with two runs per query tile and the edge tiles' predicate over two terms (gluon_rule's "runs" mode)
SHAPES = {
    "1d": ((1, 1, 256), (1, 1, 128), (1, 1, 128), [[0, 0, 0, 0, 1, 0, 1, 0, 2], [0, 0, 1, 0, 1, 0, 1, 0, 1]],
           "whole", 0),
    "3d": ((4, 16, 16), (2, 8, 8), (1, 8, 16), [[0, 0, 0, 0, 2, 0, 2, 0, 1], [1, 1, 1, 2, 4, 1, 2, 0, 1]],
           "whole", 0),
    "1d-masked": ((1, 1, 300), (1, 1, 128), (1, 1, 128),
                  [[0, 0, 0, 0, 1, 0, 1, 0, 1, 0, 0, 1], [0, 0, 2, 0, 1, 0, 1, 0, 1, 1, 3, 0]], "runs", 2),
    # a ragged 3-D grid with the per-dimension predicate (gluon_rule's "boxes" mode): rows end in the full box
    "3d-box": ((5, 12, 20), (2, 4, 16), (2, 8, 8), [[0, 0, 0, 0, 2, 0, 2, 0, 3, 0, 1, 0, 1, 1, 2],
                                                   [2, 2, 1, 1, 3, 0, 2, 1, 3, 1, 3, 0, 0, 0, 0]], "boxes", 0),
}


def compile_kernel(module, head_dim: int, shape: str = "1d", pingpong: bool = True):
    """`module.attention_fwd` (a codegen/gluon_fwd.py, this one or an earlier one) bound to the launch
    arguments of `shape` and compiled for sm_90: the compiled kernel."""
    per = 2 if shape.endswith("-items") else 1
    grid, q_tile, kv_tile, rows, mode, terms = SHAPES[shape.removesuffix("-items")]
    tokens = grid[0] * grid[1] * grid[2]
    q = torch.zeros(1, 4, tokens, head_dim, dtype=torch.bfloat16)
    kv = torch.zeros(1, 2, tokens, head_dim, dtype=torch.bfloat16)  # GQA: two query heads per kv head
    table = torch.tensor(rows, dtype=torch.int32)
    if mode == "boxes":
        bounds = torch.zeros(2 * sum(grid), dtype=torch.int32)
    else:
        bounds = torch.zeros(terms, 2, tokens, dtype=torch.int32) if terms else None
    extra = {"mode": mode} if "mode" in inspect.signature(module.kernel_args).parameters else {}
    grid, args, kwargs = module.kernel_args(q, kv, kv, torch.empty_like(q), torch.empty(1, 4, tokens), 0.1, table, 0,
                                            2, grid, q_tile, kv_tile, pingpong=pingpong, bounds=bounds, per=per,
                                            **extra)
    driver.set_active(Sm90Driver())
    return module.attention_fwd.warmup(*args, grid=grid, **kwargs)  # the real binder and compiler


def ptxas(ptx: str) -> tuple[str, bytes]:
    """(ptxas' -v report, the cubin) of a PTX module for sm_90a."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", f"{tmp}/k.ptx", "-o", f"{tmp}/k.o"],
                             capture_output=True, text=True, check=True)
        return log.stdout + log.stderr, (Path(tmp) / "k.o").read_bytes()


def main(head_dim: int, shape: str = "1d", pingpong: bool = True) -> dict:
    kernel = compile_kernel(gluon_fwd, head_dim, shape, pingpong)
    ptx = kernel.asm["ptx"]
    report, _ = ptxas(ptx)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    setmaxnreg = {" ".join(m) for m in re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx)}
    return {"spill_stores": int(spills[1]) if spills else None, "spill_loads": int(spills[2]) if spills else None,
            "shared": kernel.metadata.shared, "setmaxnreg": sorted(setmaxnreg), "report": report}


def ptx_opcodes(ptx: str) -> collections.Counter:
    """PTX instructions by opcode (directives, labels and braces left out)."""
    ops = collections.Counter()
    for line in ptx.splitlines():
        line = line.strip()
        if not line or line[0] in ".{}/$" or line.endswith(":"):
            continue
        words = line.split()
        op = words[1] if words[0].startswith("@") else words[0]  # a predicated instruction: @%p1 bra ...
        ops[op.rstrip(";")] += 1
    return ops


def sass_opcodes(cubin: bytes) -> collections.Counter:
    """SASS instructions by opcode (cuobjdump beside Triton's ptxas)."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.o").write_bytes(cubin)
        tool = str(Path(get_ptxas(90).path).with_name("cuobjdump"))
        sass = subprocess.run([tool, "-sass", f"{tmp}/k.o"], capture_output=True, text=True, check=True).stdout
    ops = collections.Counter()
    for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass):
        ops[m[1]] += 1
    return ops


def counts(module, head_dim: int, shape: str, pingpong: bool) -> dict:
    """PTX and SASS opcode counts, registers and spills of one compile."""
    kernel = compile_kernel(module, head_dim, shape, pingpong)
    report, cubin = ptxas(kernel.asm["ptx"])
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return {"ptx": ptx_opcodes(kernel.asm["ptx"]), "sass": sass_opcodes(cubin),
            "spills": (int(spills[1]), int(spills[2])) if spills else None, "shared": kernel.metadata.shared}


def load_module(path: str):
    spec = importlib.util.spec_from_file_location("old_gluon_fwd", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def against(old_path: str, only: str = "") -> list[dict]:
    """Every shape (or those in `only`, comma-separated), head_dim and ping-pong setting compiled from
    `old_path` and from the package."""
    old = load_module(old_path)
    rows = []
    print(f"{'shape':16} {'d':>3} {'pp':>2} {'ptx old':>8} {'ptx new':>8} {'sass old':>8} {'sass new':>8} "
          f"{'spills':>7}  SASS opcodes that differ (old -> new)")
    shapes = [s for s in only.split(",") if s] or [*SHAPES, *(s + "-items" for s in SHAPES)]
    for shape, head_dim, pingpong in itertools.product(shapes, (64, 128), (True, False)):
        a, b = counts(old, head_dim, shape, pingpong), counts(gluon_fwd, head_dim, shape, pingpong)
        diff = {op: (a["sass"][op], b["sass"][op]) for op in sorted(set(a["sass"]) | set(b["sass"]))
                if a["sass"][op] != b["sass"][op]}
        row = {"shape": shape, "head_dim": head_dim, "pingpong": pingpong,
               "ptx": (sum(a["ptx"].values()), sum(b["ptx"].values())),
               "sass": (sum(a["sass"].values()), sum(b["sass"].values())),
               "spills": (a["spills"], b["spills"]), "shared": (a["shared"], b["shared"]), "sass_diff": diff}
        rows.append(row)
        spill = "0" if a["spills"] == b["spills"] == (0, 0) else f"{a['spills']}/{b['spills']}"
        print(f"{shape:16} {head_dim:3} {int(pingpong):2} {row['ptx'][0]:8} {row['ptx'][1]:8} {row['sass'][0]:8} "
              f"{row['sass'][1]:8} {spill:>7}  {' '.join(f'{k}:{x}->{y}' for k, (x, y) in diff.items())}",
              flush=True)
    return rows


if __name__ == "__main__":
    if sys.argv[1] == "--against":
        rows = against(sys.argv[2], sys.argv[4] if len(sys.argv) > 4 else "")
        json.dump(rows, open(sys.argv[3], "w") if len(sys.argv) > 3 else sys.stderr, default=list)
    else:
        args = [a for a in sys.argv[1:] if a != "--no-pingpong"]
        print(json.dumps(main(int(args[0]), *args[1:], pingpong="--no-pingpong" not in sys.argv)))
