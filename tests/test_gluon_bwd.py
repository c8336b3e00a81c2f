"""The Gluon backward (codegen.gluon_bwd) on the CPU: its tables, its dispatch rule and its sm_90 compile.

The kernel cannot run here (Gluon has no interpreter, this machine no Hopper GPU). Checked instead:
the transposed tables against a brute-force count over the reference mask, the dispatch predicate's
reasons (Hopper asked about with tensors on the meta device), and that the kernel compiles for
sm_90 with Triton's bundled ptxas without spilling. Its gradients are checked on the GPU by
bench/scripts/gluon_bwd_check.py against the float64 reference.
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
from maskdsl.codegen import dispatch
from maskdsl.codegen.config import KernelConfig
from maskdsl.codegen.dispatch import HOPPER
from maskdsl.codegen.gluon_bwd_plan import FIRST, KEY_COORD, LAST, VISIT_COORD, GluonBackwardSchedule
from maskdsl.codegen.gluon_plan import plan_ranges
from maskdsl.codegen.plan import build_plan
from maskdsl.codegen.config import default_config
from maskdsl.harness.semantics import static_mask

ROOT = Path(__file__).resolve().parent.parent


def _brute(expr, shape, q_tile, kv_tile):
    """{key tile: sorted query tiles with an attended pair in it} (flat, row-major tile indices) and
    the key tiles' grid, from the [L, L] reference mask."""
    m = static_mask(expr, shape).numpy()
    coords = np.stack(np.unravel_index(np.arange(m.shape[0]), shape), axis=1)

    def tiles(tile):
        grid = tuple(n // t for n, t in zip(shape, tile))
        return np.ravel_multi_index(tuple((coords // np.array(tile)).T), grid), grid

    qt, _ = tiles(q_tile)
    kt, k_grid = tiles(kv_tile)
    qi, ki = np.nonzero(m)
    pairs = sorted(set(zip(kt[ki].tolist(), qt[qi].tolist())))
    out: dict[int, list[int]] = {}
    for key, query in pairs:
        out.setdefault(key, []).append(query)
    return out, k_grid


CASES = [
    ("grid(1024)", "full", (128,), (128,)),
    ("grid(1024)", "block(256)", (128,), (128,)),
    ("grid(2048)", "neighborhood(window=512, stride=256)", (128,), (128,)),
    ("grid(1024)", "sink(128) & block(256)", (128,), (128,)),  # key tiles 2.. are visited by no query tile
    ("grid(32, 32)", "neighborhood(window=(24, 24), stride=(8, 8))", (8, 8), (8, 8)),
    ("grid(16, 32)", "block((4, 8))", (2, 8), (4, 4)),
    ("grid(4, 16, 16)", "block((2, 8, 8))", (2, 4, 8), (1, 8, 8)),
    ("grid(4, 16, 16)", "neighborhood(window=(2, 12, 12), stride=(2, 4, 4))", (2, 4, 4), (2, 4, 4)),
    ("grid(8, 64)", "block((8, 16)) | block((8, 64))", (2, 64), (2, 64)),
]


@pytest.mark.parametrize("layout, text, qt, kt", CASES, ids=[f"{c[0]} {c[1]}" for c in CASES])
def test_the_tables_are_the_brute_force_transposed_schedule(layout, text, qt, kt):
    mask = maskdsl.parse(f"layout g = {layout}\nmask m = {text}").masks[0]
    shape = mask.layout.shape
    ranges = plan_ranges(build_plan(mask, default_config(mask)), qt, kt, ("whole",))
    assert ranges.ok, ranges.reason
    s = GluonBackwardSchedule(ranges)
    want, k_grid = _brute(mask.expr, shape, qt, kt)
    pad = 3 - len(shape)
    got = {}
    for row in s.keys:
        coord = row[KEY_COORD:KEY_COORD + 3]
        assert (coord[:pad] == 0).all()
        key = int(np.ravel_multi_index(tuple(coord[pad:]), k_grid))
        visitors = s.visits[row[FIRST]:row[LAST], VISIT_COORD:VISIT_COORD + 3]
        q_grid = tuple(n // t for n, t in zip(shape, qt))
        got[key] = [int(np.ravel_multi_index(tuple(c[pad:]), q_grid)) for c in visitors]
    assert got == want
    counts = [int(r[LAST] - r[FIRST]) for r in s.keys]
    assert counts == sorted(counts, reverse=True), "longest key tiles first"
    assert s.pairs == sum(map(len, want.values()))
    # the rows of key tiles nobody visits: zero-filled apart
    idle = sorted(set(range(int(np.prod(k_grid)))) - set(want))
    coords = np.stack(np.unravel_index(np.arange(int(np.prod(shape))), shape), axis=1)
    key_of = np.ravel_multi_index(tuple((coords // np.array(kt)).T), k_grid)
    assert s.idle_rows.tolist() == np.nonzero(np.isin(key_of, idle))[0].tolist()


def test_only_whole_tile_schedules_are_taken():
    mask = maskdsl.parse("layout g = grid(1024)\nmask m = causal").masks[0]
    ranges = plan_ranges(build_plan(mask, default_config(mask)))
    assert ranges.mode == "runs"
    with pytest.raises(ValueError, match="whole-tile"):
        GluonBackwardSchedule(ranges)


def _compile(text: str, deterministic: bool = False):
    """What maskdsl.compile gives the first mask of `text` (the Gluon backward takes the atomic-dQ one)."""
    spec = maskdsl.parse(text)
    return maskdsl.compile(spec, spec.masks[0].name, deterministic=deterministic)


def _meta(tokens: int, head_dim: int = 128, dtype=torch.bfloat16, heads: int = 2):
    return torch.empty(1, heads, tokens, head_dim, device="meta", dtype=dtype)


def test_the_backward_is_opt_in_until_measured(monkeypatch):
    fn = _compile("layout g = grid(512)\nmask m = block(256)")
    q = _meta(512)
    monkeypatch.delenv("MASKDSL_GLUON_BWD", raising=False)
    assert "MASKDSL_GLUON_BWD=1" in dispatch.can_run_gluon_backward(fn, q, target=HOPPER)
    assert dispatch.choose_backward(fn, q, target=HOPPER) == "triton"
    monkeypatch.setenv("MASKDSL_GLUON_BWD", "1")
    assert dispatch.can_run_gluon_backward(fn, q, target=HOPPER) is None
    assert dispatch.choose_backward(fn, q, target=HOPPER) == "gluon"
    assert dispatch.compatible_backwards(fn, q, target=HOPPER) == ["gluon", "triton"]
    assert dispatch.choose_backward(fn) == "triton"  # no tensors: the Gluon rule cannot tell
    exact = _compile("layout g = grid(512)\nmask m = block(256)", deterministic=True)
    assert "deterministic" in dispatch.can_run_gluon_backward(exact, q, target=HOPPER)
    assert dispatch.choose_backward(exact, q, target=HOPPER) == "triton"


def test_the_backward_rules_name_their_reason(monkeypatch):
    monkeypatch.setenv("MASKDSL_GLUON_BWD", "1")
    dense = _compile("layout g = grid(512)\nmask m = full")
    q = _meta(512)
    assert "interpreter" in dispatch.can_run_gluon_backward(dense, q, target=dispatch.Target("cuda", 9, True))
    assert "8.x" in dispatch.can_run_gluon_backward(dense, q, target=dispatch.Target("cuda", 8))
    assert "head_dim 96" in dispatch.can_run_gluon_backward(dense, _meta(512, 96), target=HOPPER)
    assert "dtype" in dispatch.can_run_gluon_backward(dense, _meta(512, dtype=torch.float32), target=HOPPER)
    bshd = torch.empty(1, 512, 2, 128, device="meta", dtype=torch.bfloat16).transpose(1, 2)
    assert dispatch.can_run_gluon_backward(dense, q, dout=q, target=HOPPER) is None
    assert dispatch.can_run_gluon_backward(dense, q, dout=bshd[:, :, :, :].expand(2, 2, 512, 128),
                                           target=HOPPER).startswith("dout")
    gqa_k = _meta(512, heads=1)
    assert dispatch.can_run_gluon_backward(dense, _meta(512, heads=4), gqa_k, gqa_k, target=HOPPER) is None
    causal = _compile("layout g = grid(512)\nmask m = causal")
    reason = dispatch.can_run_gluon_backward(causal, q, target=HOPPER)
    assert "'runs' mode" in reason and "whole tiles only" in reason
    assert dispatch.choose_backward(causal, q, target=HOPPER) == "triton"
    ragged = _compile("layout g = grid(520)\nmask m = full")  # a ragged last tile: the forward predicates it
    assert "whole tiles only" in dispatch.can_run_gluon_backward(ragged, _meta(520), target=HOPPER)
    topk = _compile("layout s = grid(512)\nmask m = topk(2, block=64)")
    assert "top-k" in dispatch.can_run_gluon_backward(topk, q, target=HOPPER)
    assert dispatch.choose_backward(topk, q, target=HOPPER) == "topk"


def test_the_cpu_keeps_the_triton_backward(monkeypatch):
    """On the CPU (the interpreter) the gradient never reaches the Gluon path, opted in or not."""
    monkeypatch.setenv("MASKDSL_GLUON_BWD", "1")
    spec = maskdsl.parse("layout g = grid(256)\nmask m = block(128)")
    fn = maskdsl.compile(spec, "m", KernelConfig((64,), (64,), 4, 2), deterministic=False)
    from maskdsl.codegen import gluon_bwd

    monkeypatch.setattr(gluon_bwd, "gluon_backward", lambda *a: pytest.fail("Gluon backward taken on the CPU"))
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, 256, 64, generator=gen).requires_grad_() for _ in range(3))
    fn(q, k, v).sum().backward()
    assert q.grad is not None and not q.grad.isnan().any()


def _ptxas():
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(90).path
    except Exception as exc:  # noqa: BLE001 - any failure to locate it means: cannot compile here
        return None, f"Triton's bundled ptxas is unavailable ({exc})"
    return (path, None) if path and os.path.exists(path) else (None, f"ptxas not found at {path!r}")


@pytest.mark.parametrize("args", [("128", "1d"), ("64", "3d", "--gqa"),
                                  ("128", "3d", "--gqa", "--pingpong", "--writer-warps", "2")])
def test_kernel_compiles_for_sm90_without_spills(args):
    """The real launch arguments (descriptors, the tables; MHA on a 1-D order, GQA on 3-D boxes; the
    knobs) bound and compiled through the JIT for sm_90 (tests/gluon_bwd_compile.py, in a process
    without the interpreter), then ptxas' report."""
    ptxas, why = _ptxas()
    if ptxas is None:
        pytest.skip(why)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "gluon_bwd_compile.py"), *args], env=env,
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert (got["spill_stores"], got["spill_loads"]) == (0, 0), got["report"]
    assert "dec 24" in got["setmaxnreg"] and "dec 240" in got["setmaxnreg"], got["setmaxnreg"]
    assert any(a.startswith("atom.global") and "add" in a and "f32" in a for a in got["atomics"]), got["atomics"]
    assert got["shared"] <= 232448  # Hopper's opt-in shared memory per block
    assert (got["delta"]["spill_stores"], got["delta"]["spill_loads"]) == (0, 0)
