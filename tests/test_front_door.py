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


def test_deterministic_chooses_the_backwards_dq_mode(tmp_path, monkeypatch):
    """`deterministic` decides BackwardConfig.atomic: True the split backward (bitwise run to run), False
    the atomic-dQ one; None the module default; a contradicting explicit config is refused with a hint."""
    import pytest

    from maskdsl.codegen.config import DETERMINISTIC, BackwardConfig, KernelConfig

    monkeypatch.setenv("MASKDSL_TUNING_DB", f"sqlite:///{tmp_path / 'absent.db'}")
    text = "layout s = grid(64)\nmask m = sliding_window(9, causal=true)"
    assert maskdsl.compile(maskdsl.parse(text), "m", deterministic=True).backward_config.atomic is False
    assert maskdsl.compile(maskdsl.parse(text), "m", deterministic=False).backward_config.atomic is True
    assert maskdsl.compile(maskdsl.parse(text), "m").backward_config.atomic is (not DETERMINISTIC)
    split = BackwardConfig(KernelConfig((16,), (16,)), KernelConfig((16,), (16,)))
    assert maskdsl.compile(maskdsl.parse(text), "m", backward_config=split).backward_config == split
    with pytest.raises(ValueError, match="contradicts backward_config"):
        maskdsl.compile(maskdsl.parse(text), "m", backward_config=split, deterministic=False)
    with pytest.raises(ValueError, match="deterministic must be"):
        maskdsl.compile(maskdsl.parse(text), "m", deterministic="yes")


def test_backward_config_key_round_trips_the_dq_mode():
    from maskdsl.codegen.config import BackwardConfig, KernelConfig

    for atomic in (False, True):
        cfg = BackwardConfig(KernelConfig((64,), (32,), 4, 2), KernelConfig((128,), (64,), 8, 3), atomic)
        assert BackwardConfig.from_key(cfg.key()) == cfg
    assert BackwardConfig.from_key("bwd-q64_k64_w4_s2-q128_k64_w8_s2-atomic").atomic
    import pytest

    with pytest.raises(ValueError, match="atomic"):
        BackwardConfig.from_key("bwd-q64_k64_w4_s2-q128_k64_w8_s2-fast")
