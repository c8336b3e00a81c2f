"""The Gluon forward's rule (codegen.gluon_plan) and its sm_90 compile, on the CPU.

The kernel itself cannot run here: Gluon has no interpreter and this machine no Hopper GPU. What
is checked instead: the key-tile ranges against a brute-force count over the reference mask, the
dispatch predicate (CPU tensors, the interpreter, the switch, layouts), and that the kernel
compiles for sm_90 with Triton's bundled ptxas without spilling. Its outputs are checked on the
GPU by `maskdsl bench` (every config's rows against the float64 reference before timing) and by
the device script the coordinator runs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import maskdsl
from maskdsl.codegen.compiled import compile_attention
from maskdsl.codegen.config import KernelConfig, default_config
from maskdsl.codegen.gluon_plan import GluonSchedule, layout_blocker, row_stride, tensor_blocker, tile_ranges
from maskdsl.codegen.plan import build_plan
from maskdsl.semantics import static_mask

ROOT = Path(__file__).resolve().parent.parent

# (layout, mask, query tile, key tile, whether the Gluon kernel can run it)
CASES = [
    ("grid(512)", "full", 64, 64, True),
    ("grid(512)", "block(128)", 64, 32, True),
    ("grid(1024)", "neighborhood(window=256, stride=128)", 64, 64, True),  # GNA, tiles divide the strides
    ("grid(1024)", "block(128) | block(512)", 64, 64, True),  # nested blocks: the runs merge
    ("grid(1024)", "sink(128) & block(256)", 64, 64, True),  # query tiles 3.. visit nothing
    ("grid(1, 512)", "full", 64, 64, True),  # extent-1 outer dimensions are a 1-D order
    ("grid(1024)", "sliding_window(129)", 64, 64, False),  # partial diagonal tiles
    ("grid(512)", "causal", 64, 64, False),
    ("grid(1024)", "neighborhood(window=256, stride=64)", 64, 64, False),  # window edges cut tiles
    ("grid(1024)", "block(128) | sink(64)", 64, 64, False),  # the sink's run and the block's leave a gap
    ("grid(1024)", "dilated(window=8, dilation=4)", 64, 64, False),
    ("grid(520)", "full", 64, 64, False),  # ragged last tile
]


def brute(expr, shape, bm, bn):
    """(lo, hi) per query tile from the [L, L] reference mask, or None where a visited tile is partial
    or the visited tiles are not one run."""
    m = static_mask(expr, shape)
    n = m.shape[0]
    if n % bm or n % bn:
        return None
    tiles = m.reshape(n // bm, bm, n // bn, bn)
    seen, full = tiles.any(3).any(1), tiles.all(3).all(1)
    if (seen & ~full).any():
        return None
    lo, hi = [], []
    for row in seen:
        idx = torch.nonzero(row).flatten().tolist()
        if idx and idx != list(range(idx[0], idx[-1] + 1)):
            return None
        lo.append(idx[0] if idx else 0)
        hi.append(idx[-1] + 1 if idx else 0)
    return np.array(lo), np.array(hi)


def _plan(layout, text):
    mask = maskdsl.parse(f"layout g = {layout}\nmask m = {text}").masks[0]
    return mask, build_plan(mask, default_config(mask))


@pytest.mark.parametrize("layout, text, bm, bn, ok", CASES, ids=[f"{c[0]} {c[1]}" for c in CASES])
def test_tile_ranges_equal_a_brute_force_count(layout, text, bm, bn, ok):
    mask, plan = _plan(layout, text)
    want = brute(mask.expr, mask.layout.shape, bm, bn)
    got = tile_ranges(plan, bm, bn)
    assert (want is not None) == ok, "the case list says otherwise"
    assert got.ok == ok, got.reason
    if ok:
        assert got.lo.tolist() == want[0].tolist() and got.hi.tolist() == want[1].tolist()


def test_idle_tiles_are_left_out_of_the_table_and_filled_apart():
    _, plan = _plan("grid(1024)", "sink(128) & block(256)")
    schedule = GluonSchedule(tile_ranges(plan, 128, 128))
    # tile 0 (the sink rows) sees key tiles 0-1 (its block), tile 1 sees the sink's key tile only
    assert schedule.table.tolist() == [[0, 0, 2], [1, 0, 1]]
    assert schedule.idle_rows.tolist() == list(range(256, 1024))
    table, rows = schedule.on("cpu")
    assert table.dtype == torch.int32 and rows.dtype == torch.int64 and schedule.on("cpu")[0] is table


def test_refusals_name_the_reason():
    assert "partially seen" in tile_ranges(_plan("grid(1024)", "sliding_window(129)")[1]).reason
    assert "more than one run" in tile_ranges(_plan("grid(1024)", "block(256) | sink(128)")[1]).reason
    # a 2-D grid is refused even where its row-major order would qualify (the rule stays 1-D)
    assert "1-D token order" in tile_ranges(_plan("grid(8, 128)", "full")[1]).reason
    assert "not a multiple" in tile_ranges(_plan("grid(1000)", "full")[1]).reason


def test_layout_rule():
    q = torch.zeros(2, 3, 256, 128, dtype=torch.float16)
    assert row_stride(q) == 128 and layout_blocker(q, q, q, q) is None
    packed = torch.zeros(2, 3, 256, 3 * 128, dtype=torch.float16)[..., :128]  # rows 3 x head_dim apart
    assert row_stride(packed) == 384 and layout_blocker(packed, q, q, q) is None
    blhd = torch.zeros(2, 256, 3, 128, dtype=torch.float16).transpose(1, 2)  # heads do not fold into tokens
    assert row_stride(blhd) is None and "q (strides" in layout_blocker(blhd, q, q, q)
    shifted = torch.zeros(2 * 3 * 256 * 128 + 1, dtype=torch.float16)[1:].view(2, 3, 256, 128)  # 2-byte aligned
    assert row_stride(shifted) is None and "out" in layout_blocker(q, q, q, shifted)
    assert "dtype" in layout_blocker(q.float(), q, q, q)
    assert "head_dim" in layout_blocker(q[..., :96], q, q, q)
    assert "lse" in layout_blocker(q, q, q, q, torch.zeros(2, 256, 3).transpose(1, 2))


def test_cpu_and_interpreter_and_switch_keep_the_template(monkeypatch):
    q = torch.zeros(1, 1, 256, 64, dtype=torch.float16)
    assert "interpreter" in tensor_blocker(q, q, q, q)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "cpu" in tensor_blocker(q, q, q, q)
    monkeypatch.setenv("MASKDSL_GLUON", "0")
    assert tensor_blocker(q, q, q, q) == "MASKDSL_GLUON=0"


def test_compiled_attention_runs_the_template_here(monkeypatch):
    """On the CPU the launch must not reach the Gluon path; the output is the reference's."""
    spec = maskdsl.parse("layout g = grid(256)\nmask m = block(128)")
    fn = compile_attention(spec, "m", KernelConfig((64,), (64,), 4, 2))
    monkeypatch.setattr(type(fn), "_launch_gluon", lambda *a: pytest.fail("Gluon path taken on the CPU"))
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 256, 64, generator=gen, dtype=torch.float16) for _ in range(3))
    assert not fn.gluon_ok(q) and "interpreter" in fn.gluon_blocker(q)
    out = torch.full_like(q, float("nan"))
    fn(q, k, v, out=out)
    want = maskdsl.reference_attention(q, k, v, spec, "m").to(torch.float32)
    assert not out.isnan().any() and (out.float() - want).abs().max() < 2e-2
    assert fn.gluon_schedule.ranges.ok  # the mask would qualify: the device decided


def _ptxas():
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(90).path
    except Exception as exc:  # noqa: BLE001 - any failure to locate it means: cannot compile here
        return None, f"Triton's bundled ptxas is unavailable ({exc})"
    return (path, None) if path and os.path.exists(path) else (None, f"ptxas not found at {path!r}")


@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernel_compiles_for_sm90_without_spills(head_dim):
    """The real launch arguments (descriptors, GQA, the table) bound and compiled through the JIT for
    sm_90 (tests/gluon_compile.py, in a process without the interpreter), then ptxas' report."""
    ptxas, why = _ptxas()
    if ptxas is None:
        print(why)
        pytest.skip(why)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "gluon_compile.py"), str(head_dim)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert (got["spill_stores"], got["spill_loads"]) == (0, 0), got["report"]
    # the loader gives registers away and the consumers take them (the 24 / 240 split)
    assert "dec 24" in got["setmaxnreg"] and "dec 240" in got["setmaxnreg"], got["setmaxnreg"]
    assert got["shared"] <= 232448  # Hopper's opt-in shared memory per block
