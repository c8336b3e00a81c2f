"""maskdsl.api: what `compile` picks when nobody tuned anything, and that it asks autotune, not codegen."""

from __future__ import annotations

from pathlib import Path

import maskdsl
from maskdsl.api import lookup_config
from maskdsl.codegen.build import untuned_config
from maskdsl.simulator import simulate

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_untuned_compile_takes_the_simulators_best_tiles(tmp_path, monkeypatch):
    """Without a tuning database the GNA example gets a perfectly block-sparse tile pair.

    The fixed near-cubic default tile is not block-sparse for this mask (its upper bound is lower);
    the simulator's ranking finds the one that is, at the same block sizes, warps and stages.
    """
    monkeypatch.setenv("MASKDSL_TUNING_DB", f"sqlite:///{tmp_path / 'absent.db'}")
    spec = maskdsl.load(EXAMPLES / "video_gna.mask")
    mask = spec.mask("gna")
    fixed = untuned_config(mask, 128)
    chosen = lookup_config(mask, spec.attention_for("gna"))
    assert not (tmp_path / "absent.db").exists()  # a lookup never creates the database
    assert (chosen.block_m, chosen.block_n, chosen.num_warps, chosen.num_stages) == (
        fixed.block_m, fixed.block_n, fixed.num_warps, fixed.num_stages)
    ours = simulate(spec, "gna", chosen.q_tile, chosen.kv_tile)
    theirs = simulate(spec, "gna", fixed.q_tile, fixed.kv_tile)
    assert ours.perfectly_block_sparse and not theirs.perfectly_block_sparse
    assert ours.upper_bound_speedup > theirs.upper_bound_speedup


def test_untuned_compile_of_a_topk_mask_keeps_its_own_tile(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKDSL_TUNING_DB", f"sqlite:///{tmp_path / 'absent.db'}")
    spec = maskdsl.load(EXAMPLES / "topk_window.mask")
    name = spec.masks[0].name
    mask = spec.mask(name)
    assert lookup_config(mask, spec.attention_for(name)) == untuned_config(mask, 128)
