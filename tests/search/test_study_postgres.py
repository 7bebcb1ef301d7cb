"""Several workers on one study in a real PostgreSQL server (issue 17): two ``lcpaq search
--worker`` processes share the study and each takes trials as they come; ``kill -9`` of one in
the middle of a trial loses only that trial; ``--resume`` marks it failed, scores the remaining
configurations and does the final step with every completed trial kept.

The server is started here from the PostgreSQL binaries (on PATH, or Debian's
/usr/lib/postgresql/*/bin, which .ci/run installs) in a temporary folder, on a unix socket only;
as root (CI) it runs as the unprivileged user ``nobody`` (postgres refuses to run as root). The
test skips, saying why, only where no server can be started.
"""

from __future__ import annotations

import functools
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from search_helpers import make_files, search_args

from lcpaq.cli import main
from lcpaq.search.study import open_storage

pytest.importorskip("psycopg2", reason="the PostgreSQL driver (pip install 'lcpaq[postgres]')")

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Seconds a step of the test may take before it fails (a loaded 2-core machine is slow).
PATIENCE_S = 600


def _binaries() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, else the newest Debian package's."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl", path=str(Path(found).parent)):
        return Path(found).parent
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(debian[-1]).parent if debian else None


def _as_server_user(command: list[str]) -> list[str]:
    """postgres refuses to run as root: as root, run it as ``nobody``."""
    if os.geteuid() != 0:
        return command
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.skip("running as root without runuser: cannot start postgres unprivileged")
    return [runuser, "-u", "nobody", "--", *command]


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL server on a unix socket in a temporary folder; its URL."""
    binaries = _binaries()
    if binaries is None:
        pytest.skip(
            "no PostgreSQL server binaries (initdb, pg_ctl; Debian: apt-get install postgresql)"
        )
    folder = Path(tempfile.mkdtemp(prefix="lcpaq-pg-"))  # short: socket paths are limited
    if os.geteuid() == 0:
        shutil.chown(folder, user="nobody")
    data, log = folder / "data", folder / "server.log"
    initdb = [str(binaries / "initdb"), "-D", str(data), "-U", "lcpaq", "--auth=trust"]
    done = subprocess.run(_as_server_user([*initdb, "--no-sync"]), capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"initdb failed: {done.stderr.strip().splitlines()[-1:]}")
    settings = f"-k {folder} -c listen_addresses='' -c fsync=off"
    pg_ctl = [str(binaries / "pg_ctl"), "-D", str(data), "-l", str(log), "-w"]
    started = subprocess.run(
        _as_server_user([*pg_ctl, "-o", settings, "start"]), capture_output=True, text=True
    )
    if started.returncode != 0:
        text = log.read_text() if log.is_file() else started.stderr
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"postgres did not start: {text.strip().splitlines()[-1:]}")
    try:
        yield f"postgresql://lcpaq@/postgres?host={folder}"
    finally:
        subprocess.run(_as_server_user([*pg_ctl, "-m", "immediate", "stop"]), capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def _worker(args: list[str], log: Path) -> subprocess.Popen:
    """``lcpaq search`` in its own process (one torch thread), stderr into ``log``."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lcpaq.cli", "--threads", "1", *args]
    with log.open("w") as stream:
        return subprocess.Popen(command, cwd=REPO_ROOT, env=environment, stderr=stream)


@functools.cache
def _storage(url: str) -> optuna.storages.RDBStorage:
    """One storage (one connection pool) per URL: polling must not open a pool per call."""
    return open_storage(url)


def _trials_of(url: str, pid: int) -> list[optuna.trial.FrozenTrial]:
    """The trials worker ``pid`` of this machine took (none while the study does not exist)."""
    try:
        study = optuna.load_study(study_name="lcpaq-search", storage=_storage(url))
    except KeyError:
        return []
    worker = f"{socket.gethostname()}:{pid}"
    return [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("worker") == worker]


def _wait_mid_trial(url: str, process: subprocess.Popen, log: Path) -> None:
    """Until ``process`` has finished a trial and is running another."""
    deadline = time.monotonic() + PATIENCE_S
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        states = {t.state.name for t in _trials_of(url, process.pid)}
        if "RUNNING" in states and {"COMPLETE", "PRUNED"} & states:
            return
        time.sleep(0.05)
    pytest.fail(f"worker {process.pid} never got to a second trial")


def test_two_workers_kill_one_resume(postgres_url, tmp_path, monkeypatch):
    from lcpaq.stages import pipeline

    monkeypatch.setattr(pipeline, "plot", lambda run_dir: [])  # best/'s figures: not tested here
    files = make_files(tmp_path)
    shared = ("--storage", postgres_url, "--seed", "0")
    first = _worker(
        search_args(files, tmp_path / "a", *shared, "--worker", trials=6), tmp_path / "a.log"
    )
    second = _worker(
        search_args(files, tmp_path / "b", *shared, "--worker", trials=6), tmp_path / "b.log"
    )
    _wait_mid_trial(postgres_url, second, tmp_path / "b.log")
    second.send_signal(signal.SIGKILL)
    second.wait()
    lost = [t.number for t in _trials_of(postgres_url, second.pid) if t.state.name == "RUNNING"]
    assert len(lost) == 1, "the killed worker was in the middle of one trial"
    assert first.wait(timeout=PATIENCE_S) == 0, (tmp_path / "a.log").read_text()
    study = optuna.load_study(study_name="lcpaq-search", storage=_storage(postgres_url))
    before = {t.number: t.value for t in study.trials if t.state.name == "COMPLETE"}
    by_worker = {t.user_attrs.get("worker") for t in study.trials if t.state.name != "RUNNING"}
    assert len(by_worker) == 2, "both workers took trials"
    assert not (tmp_path / "a" / "search_report.json").exists()  # a worker skips the final step

    final = tmp_path / "final"
    args = search_args(files, final, *shared, "--resume", "--eval", str(files["eval"]), trials=9)
    assert main(args) == 0
    study = optuna.load_study(study_name="lcpaq-search", storage=_storage(postgres_url))
    states = {t.number: t.state.name for t in study.trials}
    assert [n for n, state in states.items() if state == "FAIL"] == lost  # only that trial
    assert "RUNNING" not in states.values()
    after = {t.number: t.value for t in study.trials if t.state.name == "COMPLETE"}
    assert before.items() <= after.items()  # every completed trial kept, values unchanged
    scored = [
        t
        for t in study.trials
        if t.state.name in ("COMPLETE", "PRUNED") and "duplicate_of" not in t.user_attrs
    ]
    assert len(scored) >= 9
    assert study.trials[0].user_attrs.get("default") is True  # the reference trial, once
    assert sum(bool(t.user_attrs.get("default")) for t in study.trials) == 1
    assert (final / "search_report.json").is_file() and (final / "best" / "report.md").is_file()
