"""The front door: `maskdsl.compile` asks the tuning database for a config, then codegen for the kernel.

This module sits above codegen and autotune (nothing below imports it), which is what keeps the
import graph one-way: codegen renders and launches whatever config it is given and never looks
anything up; autotune stores and finds configs and never decides what `compile` does without one.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from maskdsl.spec import ir


class TuningDatabaseWarning(UserWarning):
    """The tuning database could not be used; the kernel was compiled with the default config."""


_WARNED: set[str] = set()


def resolve(spec, mask: str | None = None) -> tuple[ir.Spec, ir.MaskDef, ir.Attention | None]:
    """A spec (or the path of a .mask file) and a mask name -> the spec, the mask and its attention statement.

    Without a name: the mask the spec's attention statements use, else its only mask; a spec where
    that is ambiguous gets an error listing the names to choose from (every command resolves this way).
    """
    if mask is not None and not isinstance(mask, str):
        raise ValueError(f"mask must be a mask's name (a str) or None for the spec's default, got {type(mask).__name__}")
    if isinstance(spec, (str, Path)):
        from maskdsl.lang.parser import load

        spec = load(spec)
    if not isinstance(spec, ir.Spec):
        raise ValueError(f"spec must be a maskdsl.Spec or a path to a .mask file, got {type(spec).__name__}")
    from maskdsl.lang.validate import validate_spec

    validate_spec(spec)  # a Spec built in Python gets the parser's checks (names, numbers, limits)
    if mask is None:
        mask = default_mask(spec)
    return spec, spec.mask(mask), spec.attention_for(mask)


def default_mask(spec: ir.Spec) -> str:
    used = list(dict.fromkeys(att.mask for att in spec.attentions))
    if len(used) == 1:
        return used[0]
    if not used and len(spec.masks) == 1:
        return spec.masks[0].name
    names = used or [m.name for m in spec.masks]
    raise ValueError(f"the spec has {len(names)} candidate masks; pick one with --mask ({', '.join(names)})")


def lookup_config(mask: ir.MaskDef, attention: ir.Attention | None = None):
    """The best stored config (tuning database: exact problem, else the nearest), else the simulator's
    best-ranked tile pair (`maskdsl.autotune.policy.ranked_default`).

    Never tunes: a lookup reads the database and nothing else. The database is optional and stays
    so: whatever goes wrong in it (a damaged file, a bad MASKDSL_TUNING_DB, a missing driver, a
    stored config that does not fit this mask) gives one warning and the ranked default, never a
    failed compile.
    """
    return _lookup(mask, attention)[0]


def _lookup(mask: ir.MaskDef, attention: ir.Attention | None):
    """(`lookup_config`'s config, whether the database could be read)."""
    from maskdsl.autotune.policy import ranked_default

    head_dim = attention.head_dim if attention else 128
    try:
        from maskdsl.autotune.database import best_config, redact, storage_url
    except ImportError:  # optuna is not installed: compile still works without a tuning database
        return ranked_default(mask, head_dim, attention), False
    try:
        config = best_config(mask, attention)
        if config is not None:
            _check_stored(config, mask)
    except Exception as exc:  # noqa: BLE001 - see the docstring: nothing in the database may fail a compile
        _warn_once(f"the tuning database {redact(storage_url())} could not be used ({type(exc).__name__}: "
                   f"{str(exc).splitlines()[0] if str(exc) else ''}); compiling with the default config. "
                   "Fix or remove the database, or point MASKDSL_TUNING_DB at another one (docs/LIMITS.md)")
        return ranked_default(mask, head_dim, attention), False
    return config or ranked_default(mask, head_dim, attention), True


def _check_stored(config, mask: ir.MaskDef) -> None:
    """A stored config must be one this mask's kernel can take (ValueError otherwise)."""
    config.validate(mask.layout.rank)
    if mask.dynamic:
        from maskdsl.codegen.topk.forward import topk_config

        topk_config(mask, config)


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, TuningDatabaseWarning, stacklevel=4)


def compile(spec, mask: str, config=None, backward_config=None, deterministic: bool | None = None):  # noqa: A001
    """Compile `mask` of `spec` into a callable attention kernel (differentiable: it trains).

    `config` (a `maskdsl.codegen.config.KernelConfig`) overrides the tuning database's choice;
    `backward_config` (a `BackwardConfig`) the backward kernels' (default: the tuning database's
    backward study, else the simulator's best tiles at codegen's backward block sizes).

    `deterministic=True` gives a static mask the split backward, whose gradients are bitwise equal run
    to run; False the atomic-dQ backward (faster; float32 adds in a varying order, so the last bits
    vary); None: `backward_config.atomic` when given, else codegen.config.DETERMINISTIC. Top-k masks'
    backward is always deterministic.
    """
    from dataclasses import replace

    from maskdsl.codegen.build import compile_attention
    from maskdsl.codegen.config import DETERMINISTIC

    if deterministic is not None and not isinstance(deterministic, bool):
        raise ValueError(f"deterministic must be True, False or None, got {deterministic!r}")
    if deterministic is not None and backward_config is not None and backward_config.atomic == deterministic:
        raise ValueError(f"deterministic={deterministic} contradicts backward_config {backward_config.key()!r}; "
                         "hint: leave deterministic=None to take the config's dQ mode, or give a config "
                         f"{'without' if deterministic else 'with'} atomic=True")
    spec, mdef, attention = resolve(spec, mask)
    if mdef.documents:  # no tuning database yet: `config` is a codegen.documents.compiled.DocumentConfig or None
        return compile_attention(spec, mdef.name, config)
    readable = True
    if config is None:
        config, readable = _lookup(mdef, attention)
    if backward_config is None and not mdef.dynamic:
        from maskdsl.autotune.policy import ranked_backward_default

        atomic = not (DETERMINISTIC if deterministic is None else deterministic)
        if readable:  # a database the forward's lookup could not read is not asked again: one warning, one wait
            from maskdsl.autotune.database import best_backward_config

            backward_config = best_backward_config(mdef, attention, atomic=atomic)  # tuned (never raises), else None
        backward_config = backward_config or ranked_backward_default(mdef, attention.head_dim if attention else 128)
        backward_config = replace(backward_config, atomic=atomic)
    return compile_attention(spec, mdef.name, config, backward_config)  # mask None: the resolved default
