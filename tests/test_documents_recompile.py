"""No recompilation when the documents change: the real JIT, bound for sm_90 over 100 draws of offsets.

On the interpreter nothing compiles, so the proof runs in a subprocess without TRITON_INTERPRET
(tests/documents_compile.py): each draw goes through the call's own metadata and launch arguments and then
Triton's binder, which compiles on every new specialisation key. The cache of each of the four kernels
must hold one kernel after 100 draws; a new length (a new spec, 4097 not a multiple of 16) must add one,
which shows the count would see a recompile.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _compile(*args) -> dict:
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "documents_compile.py"), *args],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_one_kernel_per_cache_over_100_calls_with_new_offsets():
    report = _compile("100", "32768", "4097")  # four terms: the kernels' general walk
    assert report["32768"] == {"forward": 1, "delta": 1, "dkdv": 1, "dq": 1}
    assert report["4097"] == {"forward": 2, "delta": 2, "dkdv": 2, "dq": 2}


def test_one_term_loops_compile_once_too():
    report = _compile("100", "--mask", "causal", "32768")
    assert report["32768"] == {"forward": 1, "delta": 1, "dkdv": 1, "dq": 1}
