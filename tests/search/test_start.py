"""Where a search starts (`lcpaq.search.start`): lcpaq's default when it fits the budgets, else
its nearest fitting neighbour (issue 17: under a BitOps budget the INT8-input default ended the
study before its first trial), else no reference trial and every misfit pruned.

The (untrained) demo DigitsNet has 263,808 MACs per sample; with INT2 weights its smallest BitOps
is 0.00422 G with INT8 inputs and 0.00211 G with INT4 inputs, so ``bitops-g=0.003`` excludes every
INT8-input configuration and admits INT4 inputs.
"""

from __future__ import annotations

import json

import pytest
from search_helpers import digits_config, make_files, search_args, study_of

from lcpaq.cli import main
from lcpaq.search.space import SearchSpace
from lcpaq.search.start import neighbours

pytestmark = pytest.mark.usefixtures("single_thread")

TIGHT_BITOPS = ("--budget", "bitops-g=0.003")


def test_neighbours_change_one_cost_dimension_and_keep_weights_first(tmp_path):
    space = SearchSpace.default(("act_formats",)).with_default("act_formats", "int8")
    base = digits_config(make_files(tmp_path))
    found = neighbours(space, base)
    default = space.default_params()
    changed = [[name for name in p if p[name] != default[name]] for p in found]
    assert all(len(names) == 1 for names in changed)
    names = [names[0] for names in changed]
    # only dimensions that change what budgets count; none of the curvature-only ones
    assert set(names) == {"symmetric", "granularity", "formats", "first_last", "act_formats"}
    # first_last and act_formats keep the default's quantized weights: checked first
    assert set(names[:5]) == {"first_last", "act_formats"}
    assert names[:5] == ["first_last", *["act_formats"] * 4]
    assert len(found) == 1 + 4 + 4 + 4 + 1  # first_last, act sets, granularities, formats, symm.


def test_infeasible_default_starts_from_the_nearest_fitting_configuration(tmp_path, monkeypatch):
    from lcpaq.stages import pipeline

    monkeypatch.setattr(pipeline, "plot", lambda run_dir: [])
    files = make_files(tmp_path)
    out = tmp_path / "s"
    args = search_args(files, out, *TIGHT_BITOPS, "--also", "act_formats", trials=3)
    assert main(args) == 0
    report = json.loads((out / "search_report.json").read_text())
    start = report["start"]
    assert start["params"]["act_formats"] in ("int4-8",)
    assert "act_formats=int8" in start["note"] and "does not fit" in start["note"]
    assert "Start: lcpaq's default" in (out / "search_report.md").read_text()
    trials = study_of(out).trials
    assert trials[0].params == start["params"]  # the reference trial is the fitting start
    assert trials[0].state.name == "COMPLETE"
    assert report["default"]["trial"] == 0
    assert report["default"]["params"] == start["params"]
    assert report["size_cap_mb"] is not None  # the start's size caps every trial


def test_feasible_default_has_no_note(tmp_path, monkeypatch):
    from lcpaq.stages import pipeline

    monkeypatch.setattr(pipeline, "plot", lambda run_dir: [])
    files = make_files(tmp_path)
    out = tmp_path / "s"
    assert main(search_args(files, out, trials=1)) == 0
    start = json.loads((out / "search_report.json").read_text())["start"]
    assert start["note"] == ""
    expected = {**SearchSpace.default().default_params(), "num_samples": 32, "correction": "32"}
    assert start["params"] == expected == study_of(out).trials[0].params  # --fix'ed values


def test_nothing_fits_prunes_every_trial_and_says_why(tmp_path, capsys):
    files = make_files(tmp_path)
    out = tmp_path / "s"
    fixed = ("--fix", "act_formats=int8", "--fix", "formats=int", "--fix", "first_last=search")
    args = search_args(files, out, *TIGHT_BITOPS, *fixed, "--fix", "granularity=channel", trials=2)
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2  # the warning when the search starts, then the one-line error
    assert "nor does any configuration one change away" in lines[0]
    assert lines[1].startswith("lcpaq: error: ") and "no complete trial" in lines[1]
    assert "did not fit the budgets" in lines[1] and "bitops-g" in lines[1]
    study = study_of(out)
    assert study.user_attrs["start"]["params"] is None
    assert "size_cap_mb" not in study.user_attrs
    assert all(t.state.name == "PRUNED" for t in study.trials)
