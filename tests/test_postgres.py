"""The fleet promise on a real PostgreSQL server: several tuner processes, one study, no trial lost.

The server is a throwaway cluster on a unix socket in a temporary directory, started here with the
machine's PostgreSQL binaries (initdb, pg_ctl); as root it runs as an unprivileged user, which
PostgreSQL requires. MASKDSL_TEST_POSTGRES_URL points the test at a server of your own instead.
In CI (CI=true) a missing server is a failure, not a skip.
"""

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

SPEC = """\
layout g = grid(12, 10)
mask m = neighborhood(window=(5, 3), stride=(1, 2))
attention a(mask=m, heads=2, head_dim=16, dtype=fp32)
"""
WORKERS, TRIALS = 3, 3


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the PostgreSQL test: {reason}")
    pytest.skip(reason)


def _server_user() -> dict:
    """subprocess arguments that drop root for the server (postgres, else nobody); none when not root."""
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    _unavailable("running as root and no unprivileged user (postgres, nobody) to run the server")


@pytest.fixture(scope="module")
def postgres_url():
    url = os.environ.get("MASKDSL_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    try:
        import psycopg2  # noqa: F401 - the driver Optuna's storage needs (the `test` extra installs it)
    except ImportError:
        _unavailable("the PostgreSQL driver psycopg2 is not installed (pip install -e '.[test]')")
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not (initdb and pg_ctl):
        _unavailable("no PostgreSQL server binaries (initdb, pg_ctl) on PATH")
    as_user = _server_user()
    root = Path(tempfile.mkdtemp(prefix="maskdsl-pg-"))
    root.chmod(0o755)
    data, sock = root / "data", root / "sock"
    data.mkdir()
    sock.mkdir()
    if as_user:
        for p in (data, sock):
            os.chown(p, as_user["user"], as_user["group"])
    env = {**os.environ, "LC_ALL": "C", "HOME": str(root)}
    run = dict(env=env, cwd=root, capture_output=True, text=True, timeout=120, **as_user)
    try:
        done = subprocess.run([initdb, "-D", str(data), "-U", "maskdsl", "-A", "trust", "--no-sync"], **run)
        assert done.returncode == 0, done.stderr
        options = f"-k {sock} -c listen_addresses='' -c fsync=off -c max_connections=50"
        done = subprocess.run([pg_ctl, "-D", str(data), "-o", options, "-l", str(data / "log"), "-w", "start"], **run)
        assert done.returncode == 0, done.stderr + (data / "log").read_text()
        yield f"postgresql+psycopg2://maskdsl@/postgres?host={sock}"
    finally:
        subprocess.run([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], **run)
        shutil.rmtree(root, ignore_errors=True)


def test_tuner_processes_share_one_postgres_study(postgres_url, tmp_path):
    import optuna

    from maskdsl.autotune.database import list_studies

    path = tmp_path / "tiny.mask"
    path.write_text(SPEC)
    env = {**os.environ, "TRITON_INTERPRET": "1", "MASKDSL_CACHE_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "maskdsl.cli", "tune", str(path), "--mask", "m", "--trials", str(TRIALS),
           "--storage", postgres_url, "--quiet"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(WORKERS)]  # all start on a fresh database: schema creation races too
    outs = [p.communicate(timeout=400) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-3000:] for _, err in outs]
    rows = list_studies(postgres_url)
    assert len(rows) == 1, "every worker must land in one study"
    study = optuna.load_study(study_name=rows[0]["study"], storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == WORKERS * TRIALS == rows[0]["trials"]
    assert len({t.number for t in trials}) == WORKERS * TRIALS
    assert all(t.state.is_finished() for t in trials)
