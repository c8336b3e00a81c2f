"""The Gluon forward's rule (codegen.gluon_plan) and its sm_90 compile, on the CPU.

The kernel itself cannot run here: Gluon has no interpreter and this machine no Hopper GPU. What
is checked instead: the key-tile ranges against a brute-force count over the reference mask, the
dispatch predicate (CPU tensors, the interpreter, the switch, layouts), and that the kernel
compiles for sm_90 with Triton's bundled ptxas without spilling. Its outputs are checked on the
GPU by `maskdsl bench` (every config's rows against the float64 reference before timing) and by
the device script the coordinator runs.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import maskdsl
from maskdsl.codegen.build import compile_attention
from maskdsl.codegen.config import KernelConfig, default_config
from maskdsl.codegen.dispatch import box_strides, layout_blocker, tensor_blocker
from maskdsl.codegen.gluon_plan import GluonSchedule, plan_ranges
from maskdsl.codegen.plan import build_plan, tile_rows
from maskdsl.harness.semantics import static_mask

ROOT = Path(__file__).resolve().parent.parent

# (layout, mask, query tile, key tile, whether the Gluon kernel can run it)
CASES = [
    ("grid(512)", "full", (64,), (64,), True),
    ("grid(512)", "block(128)", (64,), (32,), True),
    ("grid(1024)", "neighborhood(window=256, stride=128)", (64,), (64,), True),  # GNA, tiles divide the strides
    ("grid(1024)", "block(128) | block(512)", (64,), (64,), True),  # nested blocks: the runs merge
    ("grid(1024)", "sink(128) & block(256)", (64,), (64,), True),  # query tiles 3.. visit nothing
    ("grid(1, 512)", "full", (1, 64), (1, 64), True),  # extent-1 outer dimensions are a 1-D order
    ("grid(32, 32)", "neighborhood(window=(24, 24), stride=(8, 8))", (8, 8), (8, 8), True),  # 2-D GNA boxes
    ("grid(16, 32)", "block((4, 8))", (2, 8), (4, 4), True),
    ("grid(8, 64)", "block((8, 16)) | block((8, 64))", (8, 16), (8, 16), True),  # boxes merge in the last dim
    ("grid(4, 16, 16)", "block((2, 8, 8))", (2, 4, 8), (1, 8, 8), True),
    ("grid(4, 16, 16)", "neighborhood(window=(2, 12, 12), stride=(2, 4, 4))", (2, 4, 4), (2, 4, 4), True),
    ("grid(1024)", "sliding_window(129)", (64,), (64,), False),  # partial diagonal tiles
    ("grid(512)", "causal", (64,), (64,), False),
    ("grid(1024)", "neighborhood(window=256, stride=64)", (64,), (64,), False),  # window edges cut tiles
    ("grid(1024)", "block(128) | sink(64)", (64,), (64,), False),  # the sink's run and the block's leave a gap
    ("grid(1024)", "dilated(window=8, dilation=4)", (64,), (64,), False),
    ("grid(520)", "full", (64,), (64,), False),  # ragged last tile
    ("grid(32, 32)", "neighborhood(window=(16, 16), stride=(8, 8))", (8, 8), (8, 8), False),  # windows off the tiles
    ("grid(4, 16, 16)", "neighborhood(window=(3, 8, 8), stride=(1, 8, 8))", (2, 4, 8), (2, 8, 8), False),
    ("grid(12, 16)", "full", (8, 8), (8, 8), False),  # 12 rows: a ragged tile in dimension 0
]


def brute(expr, shape, q_tile, kv_tile):
    """(lo, hi) [q tiles, rank] per query tile from the [L, L] reference mask, or None where a visited
    tile is partial or the visited key tiles are not one box."""
    if any(n % t for n, t in zip(shape, q_tile)) or any(n % t for n, t in zip(shape, kv_tile)):
        return None
    m = static_mask(expr, shape)
    coords = np.stack(np.unravel_index(np.arange(m.shape[0]), shape), axis=1)

    def tile_of(tile):
        grid = tuple(n // t for n, t in zip(shape, tile))
        return np.ravel_multi_index(tuple((coords // np.array(tile)).T), grid), grid

    qt, q_grid = tile_of(q_tile)
    kt, k_grid = tile_of(kv_tile)
    nq, nk = int(np.prod(q_grid)), int(np.prod(k_grid))
    pairs = torch.zeros(nq, nk, dtype=torch.int64).index_put_(
        (torch.as_tensor(qt)[:, None].expand(m.shape), torch.as_tensor(kt)[None, :].expand(m.shape)),
        m.to(torch.int64), accumulate=True)  # attended pairs per tile pair
    size = int(np.prod(q_tile)) * int(np.prod(kv_tile))
    seen = (pairs > 0).numpy()
    if ((pairs > 0) & (pairs < size)).any():
        return None
    lo, hi = np.zeros((nq, len(shape)), int), np.zeros((nq, len(shape)), int)
    for t in range(nq):
        idx = np.stack(np.unravel_index(np.nonzero(seen[t])[0], k_grid), axis=1)
        if len(idx):
            lo[t], hi[t] = idx.min(0), idx.max(0) + 1
            if np.prod(hi[t] - lo[t]) != len(idx):  # the bounding box holds tiles it does not visit
                return None
    return lo, hi


def _plan(layout, text, config=None):
    mask = maskdsl.parse(f"layout g = {layout}\nmask m = {text}").masks[0]
    return mask, build_plan(mask, config or default_config(mask))


@pytest.mark.parametrize("layout, text, qt, kt, ok", CASES, ids=[f"{c[0]} {c[1]}" for c in CASES])
def test_tile_ranges_equal_a_brute_force_count(layout, text, qt, kt, ok):
    mask, plan = _plan(layout, text)
    want = brute(mask.expr, mask.layout.shape, qt, kt)
    got = plan_ranges(plan, qt, kt, ("whole",))
    assert (want is not None) == ok, "the case list says otherwise"
    assert got.ok == ok, got.reason
    if ok:
        pad = 3 - len(qt)  # the kernel's leading dimensions of extent 1: one tile, lo 0, hi 1 where busy
        busy = (want[1] > want[0]).all(1)
        assert (got.lo[:, :pad] == 0).all() and (got.hi[:, :pad] == busy[:, None]).all()
        assert got.lo[:, pad:].tolist() == want[0].tolist() and got.hi[:, pad:].tolist() == want[1].tolist()


def test_idle_tiles_are_left_out_of_the_table_and_filled_apart():
    _, plan = _plan("grid(1024)", "sink(128) & block(256)")
    schedule = GluonSchedule(plan_ranges(plan, (128,), (128,), ("whole",)))
    # tile 0 (the sink rows) sees key tiles 0-1 (its block), tile 1 sees the sink's key tile only
    assert schedule.table.tolist() == [[0, 0, 0, 0, 1, 0, 1, 0, 2], [0, 0, 1, 0, 1, 0, 1, 0, 1]]
    assert schedule.idle_rows.tolist() == list(range(256, 1024))
    table, rows, bounds = schedule.on("cpu")
    assert table.dtype == torch.int32 and rows.dtype == torch.int64 and schedule.on("cpu")[0] is table
    assert bounds is None and not schedule.boxes  # whole tiles only: no predicate


def test_short_whole_tile_items_share_a_program(monkeypatch):
    """Items per Gluon program: 1 for long items and for predicated modes; for short whole-tile items
    enough to fill the GPU once, at most MAX_PER; MASKDSL_GLUON_PER forces a count."""
    from maskdsl.codegen.gluon_plan import MAX_PER

    _, plan = _plan("grid(32768)", "block(2048)")  # 256 query tiles of 16 key tiles each
    short = GluonSchedule(plan_ranges(plan, (128,), (128,), ("whole",)))
    assert short.items_per_program(256, 132) == 2  # one head: 128 programs run it in one wave
    assert short.items_per_program(256 * 24, 132) == MAX_PER
    assert short.items_per_program(100, 132) == 1
    _, plan = _plan("grid(32768)", "block(4096)")  # 32 key tiles per query tile: long
    assert GluonSchedule(plan_ranges(plan, (128,), (128,), ("whole",))).items_per_program(10**5, 132) == 1
    _, plan = _plan("grid(32768)", "sliding_window(2048)")  # the predicated mode keeps one item
    runs = GluonSchedule(plan_ranges(plan, modes=("runs",)))
    assert runs.bounds is not None and runs.items_per_program(10**5, 132) == 1
    monkeypatch.setenv("MASKDSL_GLUON_PER", "3")
    assert runs.items_per_program(10, 132) == 3


def test_tile_rows_match_the_templates_order():
    """A query tile's token rows (the idle fill) are the ones the Triton template gives the same tile."""
    _, plan = _plan("grid(4, 16, 16)", "block((2, 8, 8))", KernelConfig((2, 8, 8), (2, 8, 8), 4, 2))
    ranges = plan_ranges(plan, modes=("whole",))
    assert ranges.ok and ranges.q_tile == (2, 8, 8) and len(ranges.lo) == plan.q_tiles
    for t in (0, 5, plan.q_tiles - 1):
        assert ranges.rows(np.array([t])).tolist() == tile_rows(plan, t)


def test_refusals_name_the_reason():
    assert "partially seen" in plan_ranges(_plan("grid(1024)", "sliding_window(129)")[1], modes=("whole",)).reason
    assert "more than one run" in plan_ranges(_plan("grid(1024)", "block(256) | sink(128)")[1], modes=("whole",)).reason
    assert "not a multiple" in plan_ranges(_plan("grid(1000)", "full")[1], modes=("whole",)).reason
    # a multi-D grid runs the config's tiles, only when each is the kernel's 128 tokens
    cfg = KernelConfig((4, 8), (8, 8), 4, 2)
    assert "128 tokens" in plan_ranges(_plan("grid(8, 128)", "full", cfg)[1], modes=("whole",)).reason
    assert plan_ranges(_plan("grid(8, 128)", "full", KernelConfig((4, 32), (2, 64), 4, 2))[1], modes=("whole",)).ok
    # two terms whose boxes differ before the last dimension: their union is not one box of tiles
    text = "block((4, 32)) | block((8, 8))"
    assert "differ before the last" in plan_ranges(_plan("grid(8, 32)", text)[1], (4, 8), (4, 8), ("whole",)).reason


def test_layout_rule():
    q = torch.zeros(2, 3, 256, 128, dtype=torch.float16)
    assert box_strides(q, (256,)) == [256 * 128, 256 * 128, 128 * 256, 128, 1] and layout_blocker(q, q, q, q) is None
    assert box_strides(q, (4, 8, 8)) == [256 * 128, 64 * 128, 8 * 128, 128, 1]
    packed = torch.zeros(2, 3, 256, 3 * 128, dtype=torch.float16)[..., :128]  # rows 3 x head_dim apart
    assert box_strides(packed, (16, 16))[2:] == [16 * 384, 384, 1] and layout_blocker(packed, q, q, q) is None
    bshd = torch.zeros(2, 256, 3, 128, dtype=torch.float16).transpose(1, 2)  # batch does not fold into heads
    assert box_strides(bshd, (256,)) is None and "q (strides" in layout_blocker(bshd, q, q, q)
    assert box_strides(bshd[:1], (256,)) is not None  # one batch: heads and tokens interleave freely
    shifted = torch.zeros(2 * 3 * 256 * 128 + 1, dtype=torch.float16)[1:].view(2, 3, 256, 128)  # 2-byte aligned
    assert box_strides(shifted, (256,)) is None and "out" in layout_blocker(q, q, q, shifted)
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


@pytest.mark.parametrize("head_dim, shape", [(64, "1d"), (128, "1d"), (128, "3d"), (64, "1d-masked"),
                                             (128, "1d-masked"), (64, "3d-box"), (128, "3d-box"),
                                             (128, "1d-items"), (64, "3d-items")])
def test_kernel_compiles_for_sm90_without_spills(head_dim, shape):
    """The real launch arguments (descriptors, GQA, the table; a 1-D order and 3-D boxes) bound and
    compiled through the JIT for sm_90 (tests/gluon_compile.py, in a process without the
    interpreter), then ptxas' report; "-items": two work items per program (two Q buffers)."""
    ptxas, why = _ptxas()
    if ptxas is None:
        print(why)
        pytest.skip(why)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "gluon_compile.py"), str(head_dim), shape], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert (got["spill_stores"], got["spill_loads"]) == (0, 0), got["report"]
    # the loader gives registers away and the consumers take them (the 24 / 240 split)
    assert "dec 24" in got["setmaxnreg"] and "dec 240" in got["setmaxnreg"], got["setmaxnreg"]
    assert got["shared"] <= 232448  # Hopper's opt-in shared memory per block


def test_the_kernels_cache_key_holds_the_table_layout():
    """The kernel reads maskdsl.analysis.tile_table's columns at compile time: another layout must give another
    JIT cache key, or Triton's cache would hand back a kernel that reads the old columns."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])

    def key(edit: str) -> str:
        code = (f"from maskdsl.analysis import tile_table\n{edit}\nfrom maskdsl.codegen import gluon_fwd\n"
                "print(gluon_fwd.attention_fwd.cache_key)")
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stdout.split()[-1]

    same = key("")
    assert key("") == same
    assert key("tile_table.FLAG += 1") != same
    assert key("tile_table.WIDTH['boxes'] += 1") != same


def test_launch_takes_the_mode_from_the_schedule_and_checks_the_table():
    """The kernel's mode is the schedule's (a constexpr of the launch), not read off the table's width:
    a table or bounds that do not fit the mode are refused before anything compiles."""
    from maskdsl.codegen import gluon_fwd
    from maskdsl.analysis.tile_table import WIDTH

    q = torch.zeros(1, 2, 256, 64, dtype=torch.bfloat16)
    tiles = ((1, 1, 256), (1, 1, 128), (1, 1, 128))

    def args(mode, width, bounds=None):
        table = torch.zeros(2, width, dtype=torch.int32)
        return gluon_fwd.kernel_args(q, q, q, q, torch.empty(1, 2, 256), 0.1, table, 0, 2, *tiles, mode, bounds=bounds)

    runs_bounds = torch.zeros(2, 2, 256, dtype=torch.int32)
    _, _, kwargs = args("runs", WIDTH["runs"], runs_bounds)
    assert (kwargs["MODE"], kwargs["TERMS"]) == ("runs", 2)
    _, _, kwargs = args("whole", WIDTH["whole"])
    assert (kwargs["MODE"], kwargs["TERMS"]) == ("whole", 0)
    for mode, width, bounds in (("runs", WIDTH["whole"], runs_bounds), ("boxes", WIDTH["runs"], runs_bounds),
                                ("whole", WIDTH["whole"], runs_bounds), ("runs", WIDTH["runs"], None)):
        with pytest.raises(ValueError):
            args(mode, width, bounds)


def test_gluon_config_picks_a_128_token_pair_the_gluon_forward_takes():
    """The untuned default on Hopper: the simulator's best 128 x 128 pair when the Gluon table accepts it,
    checked against the table built independently here; a union with partial tiles and top-k get None."""
    from maskdsl.autotune.policy import gluon_config, hopper
    from maskdsl.codegen.plan import build_plan

    for text in ("layout v = grid(4, 16, 16)\nmask m = block((2, 16, 16))",
                 "layout v = grid(64, 64)\nmask m = neighborhood(window=(48, 48), stride=(16, 16))"):
        mask = maskdsl.parse(text).masks[0]
        cfg = gluon_config(mask)
        assert cfg is not None and math.prod(cfg.q_tile) == 128 and math.prod(cfg.kv_tile) == 128, text
        assert plan_ranges(build_plan(mask, cfg), modes=("whole",)).ok
        assert gluon_config(mask, head_dim=96) is None  # the kernel takes 64 and 128
    for text in ("layout v = grid(16, 16)\nmask m = neighborhood(window=(5, 5)) | block((4, 4))",
                 "layout s = grid(512)\nmask m = topk(2, block=64)"):
        assert gluon_config(maskdsl.parse(text).masks[0]) is None, text
    assert not hopper()  # the interpreter never runs Gluon, so CPU defaults keep the template's tiles
