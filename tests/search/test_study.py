"""The Optuna study (`lcpaq.search.study`): bad storage URLs and a missing study are one-line
errors; a resumed study must agree with the settings it was created with; stale trials of dead
processes are failed."""

from __future__ import annotations

import socket
import subprocess
import sys
from dataclasses import replace

import optuna
import pytest
from search_helpers import assert_clean_error, make_files, search_args

from lcpaq.cli import main
from lcpaq.config import AllocationConfig, AnalysisConfig, RunConfig
from lcpaq.errors import InputError
from lcpaq.search.options import SearchOptions
from lcpaq.search.space import SearchSpace
from lcpaq.search.study import fail_stale_trials, open_study, with_driver, worker_name


def test_resume_without_a_study_is_an_error(tmp_path, capsys):
    files = make_files(tmp_path)
    args = search_args(files, tmp_path / "s", "--resume", "--study-name", "mine")
    assert_clean_error(capsys, main(args), "no study 'mine'")


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("nosuchdb://x", "nosuchdb"),
        ("not a url", "not a url"),
        ("sqlite:////nonexistent/dir/x.db", "x.db"),
    ],
)
def test_bad_storage(tmp_path, capsys, url, needle):
    files = make_files(tmp_path)
    args = search_args(files, tmp_path / "s", "--storage", url)
    assert_clean_error(capsys, main(args), "--storage", needle)


def test_resumed_study_must_match_its_settings(tmp_path):
    base = RunConfig(
        AnalysisConfig(model="m", checkpoint=None, calib="c"),
        allocation=AllocationConfig(budgets=("avg-bits=3",)),
    )
    options = SearchOptions(base=base, out=tmp_path)
    space = SearchSpace.default()
    study, created = open_study(options, space)
    assert created and study.user_attrs["settings"]["proxy"] == "kl"
    with pytest.raises(InputError, match="already exists"):
        open_study(options, space)
    resumed, created = open_study(replace(options, resume=True), space)
    assert not created and resumed.study_name == study.study_name
    with pytest.raises(InputError, match="different proxy"):
        open_study(replace(options, resume=True, proxy="loss"), space)
    fixed = space.fix({"formats": "int-pow2"}, base)
    with pytest.raises(InputError, match="different space"):
        open_study(replace(options, resume=True), fixed)


def test_trials_of_dead_processes_are_failed(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'x.db'}")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    stale = study.ask()
    stale.set_user_attr("worker", f"{socket.gethostname()}:{int(dead.stdout)}")
    alive = study.ask()
    alive.set_user_attr("worker", f"{socket.gethostname()}:1")  # init: never ours, never dead
    elsewhere = study.ask()
    elsewhere.set_user_attr("worker", f"not-{socket.gethostname()}:{int(dead.stdout)}")
    mine = study.ask()
    mine.set_user_attr("worker", worker_name())  # this process runs no trial when it cleans up
    assert fail_stale_trials(study) == [stale.number, mine.number]
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states[alive.number] == states[elsewhere.number] == optuna.trial.TrialState.RUNNING


def test_postgresql_urls_name_the_installed_driver():
    assert (
        with_driver("postgresql://u@/db?host=/tmp/x") == "postgresql+psycopg2://u@/db?host=/tmp/x"
    )
    assert with_driver("postgres://u@h/db") == "postgresql+psycopg2://u@h/db"
    for url in ("postgresql+psycopg://u@h/db", "sqlite:///x.db", "mysql://u@h/db"):
        assert with_driver(url) == url


def test_workers_create_or_join_the_study(tmp_path):
    base = RunConfig(
        AnalysisConfig(model="m", checkpoint=None, calib="c"),
        allocation=AllocationConfig(budgets=("avg-bits=3",)),
    )
    options = SearchOptions(base=base, out=tmp_path, worker=True)
    space = SearchSpace.default()
    study, created = open_study(options, space)
    joined, joined_created = open_study(options, space)
    assert created and not joined_created and joined.study_name == study.study_name
    with pytest.raises(InputError, match="different proxy"):
        open_study(replace(options, proxy="loss"), space)
