"""The front door: `maskdsl.compile` asks the tuning database for a config, then codegen for the kernel.

This module sits above codegen and autotune (nothing below imports it), which is what keeps the
import graph one-way: codegen renders and launches whatever config it is given and never looks
anything up; autotune stores and finds configs and never decides what `compile` does without one.
"""

from __future__ import annotations

from pathlib import Path

from maskdsl import ir


def resolve(spec, mask: str) -> tuple[ir.Spec, ir.MaskDef, ir.Attention | None]:
    """A spec (or the path of a .mask file) and a mask name -> the spec, the mask and its attention statement."""
    if isinstance(spec, (str, Path)):
        from maskdsl.parser import load

        spec = load(spec)
    if not isinstance(spec, ir.Spec):
        raise ValueError(f"spec must be a maskdsl.Spec or a path to a .mask file, got {type(spec).__name__}")
    return spec, spec.mask(mask), spec.attention_for(mask)


def lookup_config(mask: ir.MaskDef, attention: ir.Attention | None = None):
    """The best stored config (tuning database: exact problem, else the nearest), else the untuned one.

    Never tunes: a lookup reads the database and nothing else.
    """
    from maskdsl.codegen.compiled import untuned_config

    head_dim = attention.head_dim if attention else 128
    try:
        from maskdsl.autotune.database import best_config
    except ImportError:  # optuna is not installed: compile still works with the untuned config
        return untuned_config(mask, head_dim)
    return best_config(mask, attention) or untuned_config(mask, head_dim)


def compile(spec, mask: str, config=None, backward_config=None):  # noqa: A001 - the name users expect
    """Compile `mask` of `spec` into a callable attention kernel (differentiable: it trains).

    `config` (a `maskdsl.codegen.config.KernelConfig`) overrides the tuning database's choice;
    `backward_config` (a `BackwardConfig`) the backward kernels' default tiles.
    """
    from maskdsl.codegen.compiled import compile_attention

    spec, mdef, attention = resolve(spec, mask)
    if config is None:
        config = lookup_config(mdef, attention)
    if backward_config is None:
        return compile_attention(spec, mask, config)
    return compile_attention(spec, mask, config, backward_config)
