"""The tuning database: where studies live, and the lookup `compile` does (never tuning).

Default storage: a SQLite file in the user cache directory (zero set-up, offline). Any Optuna
storage URL works instead (`--storage postgresql://...` lets many GPUs tune one study at once).
SQLite gets a long busy timeout so concurrent workers wait for the lock instead of failing.
"""

from __future__ import annotations

import fcntl
import math
import os
from functools import lru_cache
from pathlib import Path

from maskdsl import ir
from maskdsl.cache import cache_root


def default_path() -> Path:
    return cache_root() / "tuning.db"


def storage_url(url: str | None = None) -> str:
    return url or os.environ.get("MASKDSL_TUNING_DB") or f"sqlite:///{default_path()}"


def open_storage(url: str | None = None):
    """An Optuna storage; for SQLite, set-up is serialized by a lock file so concurrent workers never race.

    (Two processes creating a fresh SQLite database at once both run the schema creation and
    one fails on `table studies already exists` or the alembic version row.)
    """
    import optuna

    url = storage_url(url)
    if not url.startswith("sqlite:///"):
        return optuna.storages.RDBStorage(url)
    path = Path(url[len("sqlite:///"):])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def list_studies(url: str | None = None) -> list[dict]:
    """Every maskdsl study in the storage with its best time, speedup over the default config and trials."""
    import optuna

    from maskdsl.autotune.keys import parse_study_name
    from maskdsl.autotune.space import decode_any

    storage = open_storage(url)
    rows = []
    for s in optuna.get_all_study_summaries(storage=storage, include_best_trial=True):
        key = parse_study_name(s.study_name)
        if key is None:
            continue
        best = s.best_trial
        default_ms = s.user_attrs.get("default_ms")
        rows.append({**key, "mask": s.user_attrs.get("mask"), "mask_text": s.user_attrs.get("mask_text"),
                     "trials": s.n_trials, "best_ms": best.value if best else None,
                     "best_config": decode_any(best.params).key() if best else None, "default_ms": default_ms,
                     "speedup_vs_default": (default_ms / best.value) if best and default_ms else None,
                     "interpreted": s.user_attrs.get("interpreted", False), "study": s.study_name})
    return rows


def best_config(mask: ir.MaskDef, attention: ir.Attention | None = None, url: str | None = None, pass_: str = "fwd"):
    """The best stored config for this mask on this GPU: exact problem, else the nearest problem, else None.

    `pass_="bwd"` looks up a BackwardConfig from the backward studies instead (`best_backward_config`).
    """
    url = storage_url(url)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        return None  # nothing tuned yet: don't create a database just to look
    from maskdsl.autotune.keys import current_device
    from maskdsl.harness import Problem

    device = current_device()
    problem = Problem.for_attention(attention)
    return _lookup(url, device.name, device.capability, device.triton, mask.content_hash(), problem, pass_)


_warned: set[str] = set()


def best_backward_config(mask: ir.MaskDef, attention: ir.Attention | None = None, url: str | None = None):
    """The best stored BackwardConfig (exact problem, else the nearest), else None.

    Never raises: `compile` calls it on every static mask, and a database it cannot read (optuna
    missing, a locked or foreign storage) must leave compile on the untuned backward, with one
    warning per storage instead of an error.
    """
    try:
        config = best_config(mask, attention, url, pass_="bwd")
        if config is not None:
            config.validate(len(mask.layout.shape))  # a malformed record must not reach compile
        return config
    except Exception as exc:  # noqa: BLE001 - a lookup is an optimization, never a failure
        where = storage_url(url)
        if where not in _warned:
            _warned.add(where)
            import warnings

            warnings.warn(f"maskdsl: could not read tuned backward configs from {where} "
                          f"({type(exc).__name__}: {str(exc)[:200]}); using the untuned backward", stacklevel=2)
        return None


@lru_cache(maxsize=256)
def _lookup(url, gpu, capability, triton_version, mask_hash, problem, pass_="fwd"):
    from maskdsl.autotune.space import decode_any

    candidates = []
    for row in list_studies(url):
        if (row["gpu"], row["capability"], row["triton"], row["mask_hash"], row["pass"]) != (
                gpu, capability, f"triton-{triton_version}", mask_hash, pass_):
            continue
        if row["best_config"] is None:
            continue
        candidates.append((_distance(row["problem"], problem), row))
    if not candidates:
        return None
    _, row = min(candidates, key=lambda c: c[0])
    import optuna

    study = optuna.load_study(study_name=row["study"], storage=open_storage(url))
    return decode_any(study.best_trial.params)


def _distance(label: str, problem) -> float:
    """Problems differ by head_dim/dtype first (must match to be close), then by log of batch x heads."""
    import re

    m = re.match(r"B(\d+)H(\d+)K(\d+)D(\d+)-(\w+)", label)
    if not m:
        return math.inf
    b, h, k, d, dt = int(m[1]), int(m[2]), int(m[3]), int(m[4]), m[5]
    penalty = 0 if (d, dt) == (problem.head_dim, problem.dtype) else 1000
    return penalty + abs(math.log2(b * h) - math.log2(problem.batch * problem.heads)) + (k != problem.kv_heads) * 0.5


def clear_cache() -> None:
    _lookup.cache_clear()
