"""The fleet promise on a real PostgreSQL server: several tuner processes, one study, no trial lost.

The server is a throwaway cluster on a unix socket in a temporary directory, started here with the
machine's PostgreSQL binaries (initdb, pg_ctl); as root it runs as an unprivileged user, which
PostgreSQL requires. MASKDSL_TEST_POSTGRES_URL points the test at a server of your own instead.
In CI (CI=true) a missing server is a failure, not a skip.
"""

import os
import pwd
import shutil
import signal
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


class Server:
    """The throwaway cluster: its URL, and stop/start to take it away under a running tuner."""

    def __init__(self, pg_ctl: str, data: Path, options: str, run: dict):
        self.pg_ctl, self.data, self.options, self.run = pg_ctl, data, options, run
        self.url = f"postgresql+psycopg2://maskdsl@/postgres?host={options.split()[1]}"

    def start(self) -> None:
        done = subprocess.run([self.pg_ctl, "-D", str(self.data), "-o", self.options, "-l", str(self.data / "log"),
                               "-w", "start"], **self.run)
        assert done.returncode == 0, done.stderr + (self.data / "log").read_text()

    def stop(self) -> None:  # as a crash would: no checkpoint, connections cut
        subprocess.run([self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"], **self.run)


@pytest.fixture(scope="module")
def postgres_server():
    """The cluster this module starts (None when MASKDSL_TEST_POSTGRES_URL names a server of your own)."""
    if os.environ.get("MASKDSL_TEST_POSTGRES_URL"):
        yield None
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
    server = Server(pg_ctl, data, f"-k {sock} -c listen_addresses='' -c fsync=off -c max_connections=50", run)
    try:
        done = subprocess.run([initdb, "-D", str(data), "-U", "maskdsl", "-A", "trust", "--no-sync"], **run)
        assert done.returncode == 0, done.stderr
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_url(postgres_server):
    return os.environ.get("MASKDSL_TEST_POSTGRES_URL") or postgres_server.url


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


def test_tune_reports_a_dead_server_and_resumes_without_a_trial_left_running(postgres_server, tmp_path):
    """The server dies mid-run: a clear error (storage without its password, what failed, how to resume),
    exit status not 0; after a restart the same command resumes and fails the trial the dead run left."""
    import time

    import optuna

    if postgres_server is None:
        pytest.skip("takes the server down: runs only on the cluster this module starts")
    path = tmp_path / "tiny.mask"
    path.write_text(SPEC.replace("window=(5, 3)", "window=(3, 3)"))  # a study of its own, apart from the fleet's
    url = postgres_server.url.replace("maskdsl@", "maskdsl:hunter2@")  # trust auth: the password is never used
    env = {**os.environ, "TRITON_INTERPRET": "1", "MASKDSL_CACHE_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "maskdsl.cli", "tune", str(path), "--mask", "m", "--storage", url, "--quiet"]
    proc = subprocess.Popen(cmd + ["--trials", "200"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)

    def states():  # read-only: never waits on a lock the frozen tuner may hold (its schema set-up's)
        from maskdsl.autotune.database import TuningDatabaseError, list_studies, open_storage

        try:
            rows = [r for r in list_studies(postgres_server.url, lookup=True)
                    if r["mask_text"] == "neighborhood(window=3, stride=(1, 2))"]
        except TuningDatabaseError:  # no schema yet
            return []
        if not rows:
            return []
        study = optuna.load_study(study_name=rows[0]["study"], storage=open_storage(postgres_server.url, lookup=True))
        return [t.state for t in study.get_trials(deepcopy=False)]

    deadline = time.monotonic() + 300
    try:
        while True:  # freeze the tuner; take the server away only while the database shows a trial of it running
            assert proc.poll() is None and time.monotonic() < deadline, "the tuner ended or never ran a trial"
            proc.send_signal(signal.SIGSTOP)
            time.sleep(0.05)  # a commit already sent lands before the look
            now = states()
            if sum(s.is_finished() for s in now) >= 2 and optuna.trial.TrialState.RUNNING in now:
                break
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.2)
        postgres_server.stop()
        proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.communicate()
        postgres_server.start()
    assert proc.returncode != 0
    assert "Traceback" not in err, err[-3000:]
    assert "hunter2" not in err and "maskdsl:***@" in err, err[-3000:]
    assert "tuning database" in err and "OperationalError" in err and "resume" in err, err[-3000:]
    left = states()
    assert optuna.trial.TrialState.RUNNING in left, f"the dead run left no trial running: {left}"

    done = subprocess.run(cmd + ["--trials", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    after = states()
    assert optuna.trial.TrialState.RUNNING not in after, after
    assert after.count(optuna.trial.TrialState.FAIL) == left.count(optuna.trial.TrialState.RUNNING), (left, after)

    def ran(s):
        return sum(x in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for x in s)

    assert ran(after) == ran(left) + 1, (left, after)  # the resumed run's one trial (a queued seed, or new)
