"""The tuning database is optional: whatever is wrong with it, `maskdsl.compile` falls back to the
default config with one warning, and a lookup never writes to the file it looks into."""

import sqlite3
import warnings

import optuna
import pytest

import maskdsl
from maskdsl.api import TuningDatabaseWarning
from maskdsl.autotune.keys import Problem, current_device, study_name
from maskdsl.codegen.build import untuned_config

SPEC = "layout s = grid(40)\nmask m = sliding_window(5)\nattention a(mask=m, heads=2, head_dim=16, dtype=fp32)"


@pytest.fixture
def env(tuning_env):
    return tuning_env


def compile_with_warnings():
    spec = maskdsl.parse(SPEC)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn = maskdsl.compile(spec, "m")
        maskdsl.compile(spec, "m")  # a second compile does not warn again
    ours = [w for w in caught if issubclass(w.category, TuningDatabaseWarning)]
    assert fn.config == untuned_config(spec.mask("m"), 16)
    return ours


def _real_db(path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{path}")
    optuna.create_study(storage=storage, study_name="unrelated")
    storage.engine.dispose()
    return path.read_bytes()


@pytest.mark.parametrize("damage", ["random-bytes", "text", "truncated"])
def test_damaged_database_file_falls_back_with_one_warning(env, damage):
    path = env / "tuning.db"
    if damage == "random-bytes":
        path.write_bytes(bytes(range(256)) * 64)
    elif damage == "text":
        path.write_text("this is not a database\n" * 100)
    else:
        data = _real_db(path)
        path.write_bytes(data[: len(data) // 3])
    caught = compile_with_warnings()
    assert len(caught) == 1 and "default config" in str(caught[0].message)


@pytest.mark.parametrize("url", ["garbage", "foo://bar", "postgresql+pg8000://user:s3cret@localhost:1/db"])
def test_bad_database_url_falls_back_with_one_warning(env, monkeypatch, url):
    monkeypatch.setenv("MASKDSL_TUNING_DB", url)
    caught = compile_with_warnings()
    assert len(caught) == 1 and "could not be used" in str(caught[0].message)
    assert "s3cret" not in str(caught[0].message)


def test_tune_refuses_a_bad_url_with_a_clear_error(env, tmp_path, capsys):
    from maskdsl.cli import main

    path = tmp_path / "s.mask"
    path.write_text(SPEC)
    assert main(["tune", str(path), "--mask", "m", "--trials", "1", "--storage", "garbage"]) == 2
    assert "cannot open the tuning database 'garbage'" in capsys.readouterr().err


def _study_with(env, params):
    spec = maskdsl.parse(SPEC)
    storage = f"sqlite:///{env / 'tuning.db'}"
    name = study_name(current_device(), spec.mask("m"), Problem.of(spec, "m"))
    study = optuna.create_study(study_name=name, storage=storage)
    dists = {k: optuna.distributions.CategoricalDistribution([v]) for k, v in params.items()}
    study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=1.0))


def test_stored_config_that_does_not_fit_falls_back_with_one_warning(env):
    _study_with(env, {"tiles": "8/8", "num_warps": 3, "num_stages": 2})  # 8-token tiles, 3 warps
    caught = compile_with_warnings()
    assert len(caught) == 1 and "q_tile=(8,)" in str(caught[0].message)


def test_stored_config_that_does_not_decode_is_skipped(env):
    _study_with(env, {"tiles": "banana", "num_warps": 4, "num_stages": 2})
    compile_with_warnings()  # compiles with the default config (the record is never used)


def test_lookup_leaves_a_foreign_sqlite_file_untouched(env):
    path = env / "tuning.db"
    con = sqlite3.connect(path)
    con.execute("create table notes (x text)")
    con.execute("insert into notes values ('mine')")
    con.commit()
    con.close()
    before = path.read_bytes()
    caught = compile_with_warnings()
    assert len(caught) == 1
    assert path.read_bytes() == before
    tables = sqlite3.connect(path).execute("select name from sqlite_master where type='table'").fetchall()
    assert tables == [("notes",)]
