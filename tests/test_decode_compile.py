"""The decode kernels compile for sm_90 through the real launch path, without spills
(tests/decode_compile.py, in a process without Triton's interpreter)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _ptxas_missing() -> str | None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(90).path
    except Exception as exc:  # noqa: BLE001 - any failure to locate it means: cannot compile here
        return f"Triton's bundled ptxas is unavailable ({exc})"
    return None if path and os.path.exists(path) else f"ptxas not found at {path!r}"


@pytest.mark.parametrize("head_dim, layout, q_len, splits, mask", [
    (64, "contiguous", 1, 1, "window"), (128, "paged", 4, 3, "window"), (128, "contiguous", 16, 2, "window"),
    (256, "paged", 16, 1, "window"), (256, "contiguous", 1, 4, "window"), (128, "paged", 8, 3, "topk"),
    (64, "contiguous", 1, 1, "topk")])
def test_decode_compiles_for_sm90_without_spills(head_dim, layout, q_len, splits, mask):
    if (why := _ptxas_missing()) is not None:
        pytest.skip(why)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "decode_compile.py"), str(head_dim), layout, str(q_len),
                          str(splits), mask], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(got) == {"decode_split", "decode_check"} | ({"decode_merge"} if splits > 1 else set())
    for name, report in got.items():
        assert report["spills"] == [0, 0], (name, report)
        assert report["shared"] <= 232448  # Hopper's opt-in shared memory per block
