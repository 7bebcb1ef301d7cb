"""bench_search.py's ``workers`` phase (issue 17): several ``lcpaq search --worker`` processes on
one PostgreSQL study.

On the demo digits CNN (trained here, ~20 s; sklearn digits): the wall time of one worker and of
two workers for the same number of scored trials, each study fresh and each worker with its own
cold caches; then a kill/resume run: two workers, ``kill -9`` of one in the middle of a trial,
the other finishes, ``--resume`` does the rest and the final step; the trial table's accounting.
The server is a throwaway PostgreSQL cluster (initdb in a temporary folder, unix socket only; as
root it runs as ``nobody``).
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
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from safetensors.torch import save_file

from lcpaq.model.demo import digits_splits, train_digits_net
from lcpaq.search.study import open_storage

REPO_ROOT = Path(__file__).resolve().parents[1]


def _server_command(command: list[str]) -> list[str]:
    return command if os.geteuid() != 0 else ["runuser", "-u", "nobody", "--", *command]


@contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL server on a unix socket; its URL."""
    found = (
        shutil.which("initdb")
        or (sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [""])[-1]
    )
    if not found:
        raise SystemExit("no PostgreSQL binaries (initdb): apt-get install postgresql")
    binaries = Path(found).parent
    folder = Path(tempfile.mkdtemp(prefix="lcpaq-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, user="nobody")
    data = folder / "data"
    subprocess.run(
        _server_command(
            [str(binaries / "initdb"), "-D", str(data), "-U", "lcpaq", "--auth=trust", "--no-sync"]
        ),
        check=True,
        capture_output=True,
    )
    pg_ctl = [str(binaries / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w"]
    settings = f"-k {folder} -c listen_addresses='' -c max_connections=50"
    subprocess.run(
        _server_command([*pg_ctl, "-o", settings, "start"]), check=True, capture_output=True
    )
    try:
        yield f"postgresql://lcpaq@/postgres?host={folder}"
    finally:
        subprocess.run(_server_command([*pg_ctl, "-m", "fast", "stop"]), capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def digits_files(folder: Path) -> dict[str, Path]:
    """A trained digits CNN, its calibration file (training images) and evaluation file."""
    folder.mkdir(parents=True, exist_ok=True)
    train_x, train_y, test_x, test_y = digits_splits()
    model = train_digits_net(train_x, train_y).eval()
    checkpoint = folder / "digits.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    np.savez(folder / "calib.npz", x=train_x, y=train_y)
    np.savez(folder / "eval.npz", x=test_x, y=test_y)
    return {"checkpoint": checkpoint, "calib": folder / "calib.npz", "eval": folder / "eval.npz"}


def _args(files: dict[str, Path], url: str, study: str, out: Path, trials: int) -> list[str]:
    return [
        "--threads", "1", "-q", "search", "--model", "demo-digits",
        "--checkpoint", str(files["checkpoint"]), "--calib", str(files["calib"]),
        "--normalize", "none", "--budget", "avg-bits=3", "--proxy-samples", "64,192",
        "--storage", url, "--study-name", study, "--out", str(out), "--trials", str(trials),
    ]  # fmt: skip


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as stream:
        return subprocess.Popen(
            [sys.executable, "-m", "lcpaq.cli", *args], cwd=REPO_ROOT, env=env, stderr=stream
        )


@functools.cache
def _storage(url: str) -> optuna.storages.RDBStorage:
    """One storage (one connection pool) per URL: polling must not open a pool per call."""
    return open_storage(url)


def _study(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=_storage(url))


def _accounting(url: str, name: str) -> dict[str, Any]:
    trials = _study(url, name).trials
    states = [t.state.name for t in trials]
    return {
        "by_state": {s: states.count(s) for s in sorted(set(states))},
        "scored": sum(
            s in ("COMPLETE", "PRUNED") and "duplicate_of" not in t.user_attrs
            for s, t in zip(states, trials)
        ),
        "workers": sorted({str(t.user_attrs.get("worker")) for t in trials}),
    }


def _timed_workers(
    files, url: str, study: str, work: Path, count: int, trials: int
) -> dict[str, Any]:
    start = time.perf_counter()
    load = os.getloadavg()[0]
    processes = [
        _spawn(
            [*_args(files, url, study, work / f"{study}-w{i}", trials), "--worker"],
            work / f"{study}-w{i}.log",
        )
        for i in range(count)
    ]
    codes = [p.wait() for p in processes]
    return {
        "workers": count,
        "wall_s": time.perf_counter() - start,
        "exit_codes": codes,
        "loadavg_1min_start": load,
        "loadavg_1min_end": os.getloadavg()[0],
        **_accounting(url, study),
    }


def _kill_resume(files, url: str, work: Path, trials: int) -> dict[str, Any]:
    study = "kill-resume"
    first, second = (
        _spawn(
            [*_args(files, url, study, work / f"kr-w{i}", trials), "--worker"],
            work / f"kr-w{i}.log",
        )
        for i in range(2)
    )
    worker = f"{socket.gethostname()}:{second.pid}"
    killed_in = None
    while second.poll() is None:
        try:
            mine = [t for t in _study(url, study).trials if t.user_attrs.get("worker") == worker]
        except KeyError:
            mine = []
        done = sum(t.state.name in ("COMPLETE", "PRUNED") for t in mine)
        running = [t.number for t in mine if t.state.name == "RUNNING"]
        if done >= 3 and running:
            second.send_signal(signal.SIGKILL)
            second.wait()
            killed_in = [
                t.number
                for t in _study(url, study).trials
                if t.user_attrs.get("worker") == worker and t.state.name == "RUNNING"
            ]
            break
        time.sleep(0.05)
    first.wait()
    before = {t.number: t.value for t in _study(url, study).trials if t.state.name == "COMPLETE"}
    after_workers = _accounting(url, study)
    resume = subprocess.run(
        [sys.executable, "-m", "lcpaq.cli", *_args(files, url, study, work / "kr-resume", trials), "--resume", "--eval", str(files["eval"])],
        cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
    )  # fmt: skip
    trials_after = _study(url, study).trials
    after = {t.number: t.value for t in trials_after if t.state.name == "COMPLETE"}
    return {
        "killed_worker_running_trials": killed_in,
        "after_workers": after_workers,
        "resume_exit_code": resume.returncode,
        "after_resume": _accounting(url, study),
        "failed_trials": [t.number for t in trials_after if t.state.name == "FAIL"],
        "completed_before_resume": len(before),
        "completed_kept_with_same_value": sum(after.get(n) == v for n, v in before.items()),
    }


def phase_workers(out: Path, trials: int) -> dict[str, object]:
    work = out / "workers"
    if work.exists():
        shutil.rmtree(work)
    files = digits_files(work)
    with postgres_server() as url:
        one = _timed_workers(files, url, "one-worker", work, 1, trials)
        two = _timed_workers(files, url, "two-workers", work, 2, trials)
        killed = _kill_resume(files, url, work, trials)
    return {
        "model": "demo digits CNN (trained here), avg-bits=3, proxy slices 64,192",
        "trials": trials,
        "one_worker": one,
        "two_workers": two,
        "speedup_two_vs_one": one["wall_s"] / two["wall_s"],
        "kill_resume": killed,
        "server": "PostgreSQL (initdb in a temporary folder, unix socket), each worker 1 torch thread",
    }
