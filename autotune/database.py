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

from maskdsl.spec import ir
from maskdsl.cache import cache_root


def default_path() -> Path:
    return cache_root() / "tuning.db"


LOOKUP_WAIT_S = 1.0
"""How long a compile's lookup waits for a SQLite database another writer holds locked (sqlite3's default
is 5 s, paid by the forward's and the backward's lookup alike) before compiling with the default."""


def storage_url(url: str | None = None) -> str:
    return url or os.environ.get("MASKDSL_TUNING_DB") or f"sqlite:///{default_path()}"


class TuningDatabaseError(RuntimeError):
    """The tuning database cannot be opened or read (a bad URL, a missing driver, a damaged file)."""


def open_storage(url: str | None = None, lookup: bool = False):
    """An Optuna storage; for SQLite, set-up is serialized by a lock file so concurrent workers never race.

    (Two processes creating a fresh SQLite database at once both run the schema creation and
    one fails on `table studies already exists` or the alembic version row.)

    `lookup=True` opens it for reading only as far as the schema goes: no directory, no lock file, no
    tables are created, so looking into a file that is not a tuning database leaves it as it was.
    Any failure is a TuningDatabaseError that names the URL.
    """
    url = storage_url(url)
    try:
        return _open(url, lookup)
    except TuningDatabaseError:
        raise
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy, a driver, sqlite3 and Optuna each raise their own
        raise TuningDatabaseError(f"cannot open the tuning database {redact(url)}: {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")) from exc


def redact(url: str) -> str:
    """The URL without a password (postgresql://user:secret@host/db -> postgresql://user:***@host/db)."""
    import re

    return repr(re.sub(r"(://[^/:@]*:)[^/@]*@", r"\1***@", url))


def _open(url: str, lookup: bool):
    import optuna

    if lookup:  # a lookup waits at most LOOKUP_WAIT_S for another writer's lock, then the caller falls back
        kwargs = {"engine_kwargs": {"connect_args": {"timeout": LOOKUP_WAIT_S}}} if url.startswith("sqlite") else {}
        return optuna.storages.RDBStorage(url, skip_table_creation=True, **kwargs)
    if url.startswith("postgresql"):
        return _open_postgres(url)
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


_SCHEMA_LOCK = 0x6D61736B  # "mask": the advisory lock id that serializes schema set-up on a server


def _open_postgres(url: str):
    """Optuna's storage on PostgreSQL, its schema set-up serialized by a server-side advisory lock.

    Workers starting together on a fresh database otherwise each run CREATE TABLE, and all but one
    fail on `duplicate key value violates unique constraint "pg_type_typname_nsp_index"`.
    """
    import optuna
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as con:
            con.execute(sqlalchemy.text("SELECT pg_advisory_lock(:id)"), {"id": _SCHEMA_LOCK})
            try:
                return optuna.storages.RDBStorage(url)
            finally:
                con.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:id)"), {"id": _SCHEMA_LOCK})
    finally:
        engine.dispose()


def list_studies(url: str | None = None, lookup: bool = False) -> list[dict]:
    """Every maskdsl study in the storage with its best time, speedup over the default config and trials.

    A study whose best trial holds a config that does not decode lists `best_config` None (and is never
    looked up) instead of failing the whole listing.
    """
    import optuna

    from maskdsl.autotune.keys import parse_study_name

    storage = open_storage(url, lookup=lookup)
    rows = []
    try:
        summaries = optuna.get_all_study_summaries(storage=storage, include_best_trial=True)
    except Exception as exc:  # noqa: BLE001 - a file that is not a tuning database, a lost connection
        raise TuningDatabaseError(f"cannot read the tuning database {redact(storage_url(url))}: "
                                  f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    for s in summaries:
        key = parse_study_name(s.study_name)
        if key is None:
            continue
        best = s.best_trial
        default_ms = s.user_attrs.get("default_ms")
        config = _decoded(best.params) if best else None
        rows.append({**key, "mask": s.user_attrs.get("mask"), "mask_text": s.user_attrs.get("mask_text"),
                     "trials": s.n_trials, "best_ms": best.value if best else None,
                     "best_config": config.key() if config else None, "default_ms": default_ms,
                     "speedup_vs_default": (default_ms / best.value) if best and default_ms else None,
                     "interpreted": s.user_attrs.get("interpreted", False), "study": s.study_name})
    return rows


def _decoded(params):
    """A stored trial's config, or None when the record is malformed (edited, from another maskdsl)."""
    from maskdsl.autotune.space import decode_any

    try:
        return decode_any(params)
    except (KeyError, ValueError, TypeError, AttributeError):
        return None


def best_config(mask: ir.MaskDef, attention: ir.Attention | None = None, url: str | None = None, pass_: str = "fwd"):
    """The best stored config for this mask on this GPU: exact problem, else the nearest problem, else None.

    Reads only: a missing SQLite file is "nothing tuned", and nothing is ever created or written. A
    database that cannot be read raises TuningDatabaseError (the front door falls back to the default).

    `pass_="bwd"` (or "bwd-atomic") looks up a BackwardConfig from those backward studies instead
    (`best_backward_config`).
    """
    url = storage_url(url)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        return None  # nothing tuned yet: don't create a database just to look
    from maskdsl.autotune.keys import current_device
    from maskdsl.harness.measure import Problem

    device = current_device()
    problem = Problem.for_attention(attention)
    return _lookup(url, device.name, device.capability, device.triton, mask.content_hash(), problem, pass_)


_warned: set[str] = set()


def best_backward_config(mask: ir.MaskDef, attention: ir.Attention | None = None, url: str | None = None,
                         atomic: bool = False):
    """The best stored BackwardConfig of the split backward's studies, or with `atomic` of the
    atomic-dQ backward's (exact problem, else the nearest), else None.

    Never raises: `compile` calls it on every static mask, and a database it cannot read (optuna
    missing, a locked or foreign storage) must leave compile on the untuned backward, with one
    warning per storage instead of an error.
    """
    try:
        config = best_config(mask, attention, url, pass_="bwd-atomic" if atomic else "bwd")
        if config is not None:
            config.validate(len(mask.layout.shape))  # a malformed record must not reach compile
        return config
    except Exception as exc:  # noqa: BLE001 - a lookup is an optimization, never a failure
        where = redact(storage_url(url))  # never print a password
        if where not in _warned:
            _warned.add(where)
            import warnings

            warnings.warn(f"maskdsl: could not read tuned backward configs from {where} "
                          f"({type(exc).__name__}: {str(exc)[:200]}); using the untuned backward", stacklevel=2)
        return None


@lru_cache(maxsize=256)
def _lookup(url, gpu, capability, triton_version, mask_hash, problem, pass_="fwd"):
    candidates = []
    for row in list_studies(url, lookup=True):
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

    try:
        study = optuna.load_study(study_name=row["study"], storage=open_storage(url, lookup=True))
        params = study.best_trial.params
    except TuningDatabaseError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise TuningDatabaseError(f"cannot read study {row['study']!r}: {type(exc).__name__}: {exc}") from exc
    return _decoded(params)


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
