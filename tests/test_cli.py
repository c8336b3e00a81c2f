"""The command line: check every example, fmt round-trips, show draws a picture, errors exit 2."""

import subprocess
import sys

import pytest
import torch

import maskdsl
from maskdsl.cli import main

from conftest import EXAMPLES

EXAMPLE_FILES = sorted(EXAMPLES.glob("*.mask"))


def test_examples_exist():
    names = {p.stem for p in EXAMPLE_FILES}
    assert {"llm_sliding_window", "image_2d", "video_3d", "video_gna", "image_dilated", "video_blocked",
            "streaming_llm", "topk_window"} <= names


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=[p.stem for p in EXAMPLE_FILES])
def test_examples_pass_check(path, capsys):
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    spec = maskdsl.load(path)
    for mask in spec.masks:
        assert f"{mask.name}: on {mask.layout.name}" in out
    assert out.strip().endswith(f"spec hash {spec.content_hash()})")


def test_check_reports_exact_density(tmp_path, capsys):
    path = tmp_path / "w.mask"
    path.write_text("layout s = grid(10)\nmask w = sliding_window(3, causal=true)\n")
    main(["check", str(path)])
    # rows see 1, 2, 3, 3, ... keys: 1 + 2 + 8 * 3 = 27 of 100 pairs
    assert "density 27.0000%" in capsys.readouterr().out


def test_fmt_prints_canonical_text(capsys):
    main(["fmt", str(EXAMPLES / "video_3d.mask")])
    out = capsys.readouterr().out
    assert "mask sparse = neighborhood(window=(15, 24, 40)) | sink(4) on video" in out
    assert maskdsl.parse(out) == maskdsl.load(EXAMPLES / "video_3d.mask")


def test_show_draws_png(tmp_path):
    out = tmp_path / "m.png"
    assert main(["show", str(EXAMPLES / "video_gna.mask"), "--mask", "gna", "-o", str(out), "--query", "0,0,0"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_exit_2_with_location(tmp_path):
    path = tmp_path / "bad.mask"
    path.write_text("layout s = grid(8)\nmask a = sliding_window(9)\n")
    proc = subprocess.run([sys.executable, "-m", "maskdsl.cli", "check", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert f"{path}:2:" in proc.stderr and "window 9 is larger than the extent 8" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_check_topk_restriction_is_not_a_static_part(tmp_path, capsys):
    """`topk & window`: the window only limits where picks land, so nothing is attended whatever the data."""
    path = tmp_path / "tw.mask"
    path.write_text("layout s = grid(1024)\nmask m = topk(k=4, block=64) & sliding_window(129)\n")
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "no static part" in out and "static part density" not in out
    # every row sees exactly 129 keys (windows shift at the edges, they do not shrink): 129 / 1024 = 12.60%,
    # below the picks' own bound of 4 blocks of 64 keys per row (25%)
    assert "density at most 12.60%" in out
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 1024, 8, generator=gen), torch.randn(1, 2, 1024, 8, generator=gen)
    assert maskdsl.reference_mask(maskdsl.load(path), "m", q, k).float().mean().item() <= 129 / 1024


def test_check_topk_with_a_static_part_counts_it_exactly(capsys):
    assert main(["check", str(EXAMPLES / "topk_window.mask")]) == 0
    out = capsys.readouterr().out
    # static part (sliding_window(512, causal) | sink(4)) & causal on 32,768 tokens: row i sees min(i + 1, 512)
    # window keys, and rows past the window the 4 sinks too
    tokens = 32768
    pairs = sum(range(1, 513)) + (tokens - 512) * (512 + 4)
    assert f"static part density {pairs / tokens**2:.4%}" in out
    # the picks add at most 16 blocks of 128 keys per row
    assert f"density at most {pairs / tokens**2 + 16 * 128 / tokens:.2%}" in out


PIPED = [("check", str(EXAMPLES / "video_3d.mask")), ("simulate", str(EXAMPLES / "video_gna.mask"), "--json")]


@pytest.mark.parametrize("args", PIPED, ids=["check", "simulate-json"])
def test_a_reader_that_leaves_ends_the_command_quietly(args):
    """The pipe is closed before the command writes: it stops with the SIGPIPE status and no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "maskdsl.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=EXAMPLES.parent)
    proc.stdout.close()  # the child is still importing: its first write meets a closed pipe
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, err
    assert err == ""


@pytest.mark.parametrize("args", PIPED, ids=["check", "simulate-json"])
def test_piped_into_head_prints_the_first_line_and_nothing_on_stderr(args):
    command = " ".join([sys.executable, "-m", "maskdsl.cli", *args]) + " | head -1"
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=EXAMPLES.parent, timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("local: on video" if args[0] == "check" else "{") and proc.stdout.count("\n") == 1


def test_run_checks_a_slice_of_query_tiles_in_the_interpreter(tmp_path, capsys):
    path = tmp_path / "two.mask"
    path.write_text("layout g = grid(9, 13)\nmask m = neighborhood(window=(5, 6))\nmask n = full\n"
                    "attention a(mask=m, heads=2, head_dim=16, dtype=fp32)\n")
    assert main(["run", str(path), "--tiles", "3", "--q-tile", "4,4", "--kv-tile", "4,8"]) == 0
    out = capsys.readouterr().out
    # the attention statement's mask; of 3 x 4 tiles the first, the middle and the last (4x4 + 4x4 + 1x1 rows)
    assert "mask m = neighborhood(window=(5, 6))" in out and "kernel q4x4_k4x8" in out
    assert "query tiles [0, 6, 11]" in out and ": 33 rows, relative error" in out and out.strip().endswith("ok")
    path.write_text("layout g = grid(9, 13)\nmask m = neighborhood(window=(5, 6))\nmask n = full\n")
    assert main(["run", str(path)]) == 2
    assert "pick one with --mask (m, n)" in capsys.readouterr().err


def test_run_a_topk_mask(tmp_path, capsys):
    path = tmp_path / "tk.mask"
    path.write_text("layout s = grid(100)\nmask m = (topk(k=1, block=32) | sliding_window(5, causal=true)) & causal\n")
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "query tiles [0, 2]" in out and ": 64 rows" in out and out.strip().endswith("ok")
