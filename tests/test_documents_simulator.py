"""The simulator's document tiles against brute force over the oracle mask, and its prediction's shape."""

import random

import numpy as np
import pytest

import maskdsl
from maskdsl.harness.documents import document_mask
from maskdsl.simulator.documents import _columns, _rows, document_tiles, predict_documents
from maskdsl.spec.documents import column_interval, document_form, row_interval


def draw(rng, length, docs):
    cuts = sorted(rng.randint(0, length) for _ in range(docs - 1))
    offsets = [0, *cuts, length]
    return offsets, [rng.randint(0, b - a) for a, b in zip(offsets, offsets[1:])]


def blocks(mask, rows, cols):
    """[row tiles, col tiles]: (any pair attended, every pair attended) per block, padding excluded."""
    n = mask.shape[0]
    nr, nc = -(-n // rows), -(-n // cols)
    some = np.zeros((nr, nc), bool)
    every = np.zeros((nr, nc), bool)
    for a in range(nr):
        for b in range(nc):
            block = mask[a * rows:(a + 1) * rows, b * cols:(b + 1) * cols]
            some[a, b] = bool(block.any())
            every[a, b] = bool(block.all()) and (b + 1) * cols <= n
    return some, every


@pytest.mark.parametrize("inner", ["causal", "sliding_window(9, causal=true)", "full", "sliding_window(12)"])
@pytest.mark.parametrize("seed", range(3))
def test_single_term_tiles_are_exactly_the_attended_and_whole_blocks(inner, seed):
    rng = random.Random(seed)
    length = rng.randint(20, 90)
    offsets, _ = draw(rng, length, rng.randint(1, 6))
    expr = maskdsl.parse(f"layout s = grid({length})\nmask m = document & ({inner})\n").mask("m").expr
    mask = document_mask(expr, length, offsets).numpy()
    some, every = blocks(mask, 16, 8)
    fwd = document_tiles(expr, length, offsets, None, 16, 8)
    assert list(fwd.full + fwd.partial) == list(some.sum(1))
    assert list(fwd.full) == list(every.sum(1))
    some_t, every_t = blocks(mask.T.copy(), 8, 16)
    bwd = document_tiles(expr, length, offsets, None, 16, 8, transposed=True)
    assert list(bwd.full + bwd.partial) == list(some_t.sum(1))
    assert list(bwd.full) == list(every_t.sum(1))


@pytest.mark.parametrize("inner", ["causal | prefix", "sliding_window(5, causal=true) | (sink(3) & causal)"])
def test_unions_visit_every_attended_block_and_only_whole_ones_run_unmasked(inner):
    rng = random.Random(4)
    length = 77
    offsets, prefix = draw(rng, length, 5)
    expr = maskdsl.parse(f"layout s = grid({length})\nmask m = document & ({inner})\n").mask("m").expr
    mask = document_mask(expr, length, offsets, prefix).numpy()
    some, every = blocks(mask, 16, 16)
    tiles = document_tiles(expr, length, offsets, prefix, 16, 16)
    assert (tiles.full + tiles.partial >= some.sum(1)).all()
    assert (tiles.full <= every.sum(1)).all()


def test_numpy_intervals_are_the_rule():
    rng = random.Random(1)
    length = 60
    offsets, prefix = draw(rng, length, 6)
    expr = maskdsl.parse("layout s = grid(60)\nmask m = document & (sliding_window(7) | prefix | "
                         "sink(2) & sliding_window(5, causal=true))\n").mask("m").expr
    tok = np.arange(length)
    doc = np.searchsorted(offsets, tok, side="right") - 1
    s, e = np.array(offsets)[doc], np.array(offsets)[doc + 1]
    p = np.array(prefix)[doc]
    for term in document_form(expr).terms:
        lo, hi = _rows(term, tok, s, e, p)
        clo, chi = _columns(term, tok, s, e, p)
        for i in range(length):
            want = row_interval(term, i, s[i], e[i], p[i])
            assert (lo[i], hi[i]) == want or (hi[i] <= lo[i] and want[1] <= want[0])
            want = column_interval(term, i, s[i], e[i], p[i])
            assert (clo[i], chi[i]) == want or (chi[i] <= clo[i] and want[1] <= want[0])


def test_prediction_grows_with_longer_documents_and_respects_its_bound():
    length = 32768
    expr = maskdsl.parse(f"layout s = grid({length})\nmask m = document & causal\n").mask("m").expr
    short = predict_documents(expr, length, list(range(0, length + 1, 1024)), heads=8)
    whole = predict_documents(expr, length, [0, length], heads=8)
    assert whole.pairs > 10 * short.pairs
    for p in (short, whole):
        assert p.forward_bound_us <= p.forward_us
        assert p.backward_bound_us is None or p.backward_bound_us <= p.backward_us


SPEC = """layout seq = grid(4096)
mask packed = document & causal
mask plm = document & (causal | prefix)
attention main(mask=packed, heads=4, head_dim=128, dtype=bf16)
"""


def test_cli_check_and_simulate_document_masks(tmp_path, capsys):
    import json

    from maskdsl.cli import main

    path = tmp_path / "d.mask"
    path.write_text(SPEC)
    assert main(["check", str(path)]) == 0
    assert "density depends on the documents" in capsys.readouterr().out
    assert main(["simulate", str(path), "--lengths", "128,1024", "--json"]) == 0
    many = json.loads(capsys.readouterr().out)["mean"]
    assert main(["simulate", str(path), "--lengths", "4096,4096", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)["mean"]
    assert one["pairs"] > 3 * many["pairs"]  # one long document: many more tile pairs than short ones
    assert main(["simulate", str(path), "--mask", "plm", "--lengths", "0,100,4000"]) == 2
    assert "must run from 0 to 4096" in capsys.readouterr().err


def test_commands_without_document_support_say_so(tmp_path, capsys):
    from maskdsl.cli import main

    path = tmp_path / "d.mask"
    path.write_text(SPEC)
    assert main(["compile", str(path), "--mask", "packed", "-o", str(tmp_path / "k.py")]) == 2
    assert "pass a DocumentConfig" in capsys.readouterr().err
    assert main(["show", str(path), "--mask", "packed", "-o", str(tmp_path / "x.png")]) == 2
    assert "depends on the offsets" in capsys.readouterr().err


@pytest.mark.parametrize("inner", ["neighborhood(window=(9, 3, 4), causal=(true, false, false))",
                                   "neighborhood(window=(3, 3, 4))"])
def test_grid_tiles_are_the_attended_and_whole_blocks(inner):
    rng = random.Random(5)
    offsets, _ = draw(rng, 9, 4)
    expr = maskdsl.parse(f"layout v = grid(9, 3, 4)\nmask m = document & {inner}\n").mask("m").expr
    mask = document_mask(expr, (9, 3, 4), offsets).numpy()
    some, every = blocks(mask, 16, 8)
    fwd = document_tiles(expr, (9, 3, 4), offsets, None, 16, 8)
    assert list(fwd.full + fwd.partial) == list(some.sum(1))
    assert list(fwd.full) == list(every.sum(1))
