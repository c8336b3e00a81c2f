"""The simulator's surface: errors that name the argument, `maskdsl simulate`, and the tile-map figure."""

import json

import numpy as np
import pytest

import maskdsl
from maskdsl.spec import ir
from maskdsl.cli import main
from maskdsl.simulator import simulate
from maskdsl.simulator.figure import draw_tilemaps, tile_classes

from conftest import EXAMPLES
from sim_brute import brute_counts, make_spec, video_spec


def test_bad_tiles_name_the_argument():
    spec = video_spec("neighborhood(window=(15, 24, 40))")
    with pytest.raises(ValueError, match=r"q_tile has 2 entries.*3 dimension"):
        simulate(spec, "m", (8, 8))
    with pytest.raises(ValueError, match=r"kv_tile\[1\] = 0 is not a positive integer"):
        simulate(spec, "m", (2, 8, 8), (2, 0, 8))
    with pytest.raises(KeyError, match="no mask named"):
        simulate(spec, "nope", (2, 8, 8))


def test_cli_table_json_sweep_suggest(capsys):
    path = str(EXAMPLES / "video_gna.mask")
    assert main(["simulate", path, "--mask", "gna", "--q-tile", "2,8,8", "--kv-tile", "2,8,8", "--suggest"]) == 0
    out = capsys.readouterr().out
    r = simulate(maskdsl.load(path), "gna", (2, 8, 8))
    assert "upper bound" in out and f"{r.upper_bound_speedup:.2f}x" in out and f"{r.visited_tiles:,}" in out
    assert "perfectly block-sparse neighborhoods" in out
    assert main(["simulate", path, "--q-tile", "2,8,8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["results"][0]["visited_tiles"] == r.visited_tiles
    assert main(["simulate", path, "--sweep", "--limit", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 3
    assert main(["simulate", path, "--q-tile", "128", "--no-permute"]) == 2
    assert "q_tile has 1 entries" in capsys.readouterr().err


def test_figure_classes_match_brute_force(tmp_path):
    spec = make_spec((12, 12), ir.Neighborhood((5, 5), (1, 1), (2, 2), (False, False)))
    counts, qs, ks = brute_counts(spec, (4, 4), (4, 4), True)
    want = np.where(counts == 0, 0, np.where(counts == np.multiply.outer(qs, ks), 2, 1))
    np.testing.assert_array_equal(tile_classes(spec, "m", (4, 4)), want)
    out = draw_tilemaps(spec, [("m", (4, 4), (4, 4))], str(tmp_path / "map.png"))
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_ranks_prints_each_ranks_share(capsys):
    from maskdsl.simulator.sharding import simulate_sharded

    path = str(EXAMPLES / "video_gna.mask")
    assert main(["simulate", path, "--q-tile", "2,8,8", "--kv-tile", "2,8,8", "--ranks", "3", "--zigzag",
                 "--link-gbps", "100"]) == 0
    out = capsys.readouterr().out.split("context parallel over 3 ranks (zig-zag), link 100 GB/s:")[1]
    preds = simulate_sharded(maskdsl.load(path), "gna", 3, (2, 8, 8), (2, 8, 8), 100.0, zigzag=True)
    rows = [line.split() for line in out.strip().splitlines()[1:-1]]
    assert len(rows) == 3
    for p, row in zip(preds, rows):
        assert len(p.chunks) == 2  # zig-zag: two chunks per rank
        assert int(row[0]) == p.rank and int(row[3]) == p.query_tiles and int(row[4]) == p.visited_tiles
        assert float(row[6]) == pytest.approx(p.halo_bytes / 1e6, abs=0.05)
        assert float(row[-2]) == pytest.approx(p.gather_bytes / 1e6, abs=0.05)


def test_cli_says_which_forward_and_why_not_the_earlier_ones(capsys, tmp_path):
    """Without a GPU the dispatch is Hopper's, said so; a config the Gluon forward refuses names the
    reason, and the JSON carries the same."""
    path = str(EXAMPLES / "video_gna.mask")
    assert main(["simulate", path, "--q-tile", "2,8,4"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("forward on"))
    assert "a Hopper GPU (none here" in line and "config q2x8x4_k2x8x4_w4_s3:" in line
    assert line.endswith(": triton (copy-engine loads)")
    refusal = next(x for x in out.splitlines() if x.startswith("  not gluon: "))
    assert "query and key tiles are 128 tokens" in refusal  # the rule's reason (maskdsl.analysis.gluon_rule)
    assert main(["simulate", path, "--q-tile", "2,8,8", "--json"]) == 0
    forward = json.loads(capsys.readouterr().out)["forward"]
    assert forward["forward"] == "gluon" and forward["refused"] == {} and forward["mode"] in ("whole", "boxes")
    spec_path = tmp_path / "topk.mask"
    spec_path.write_text("layout s = grid(512)\nmask m = topk(2, block=64)\n")
    assert main(["simulate", str(spec_path)]) == 0
    out = capsys.readouterr().out
    assert ": topk (" in out and "  not gluon: a top-k mask" in out and "  not triton: a top-k mask" in out
