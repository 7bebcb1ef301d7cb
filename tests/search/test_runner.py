"""The search end to end (`lcpaq.search.runner`, ``lcpaq search``): a 5-trial search on the
(untrained) demo DigitsNet with a full evaluation of the top 2, whose outputs the tests below
read; resume after an interruption; trials that share a quantized model share its proxy; a
search with quantized activations; the size cap; and bad input (one line, exit 2)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from search_helpers import (
    HEAD,
    NUM_IMAGES,
    assert_clean_error,
    make_files,
    search_args,
    study_of,
)

from lcpaq import load_quantized
from lcpaq.cli import main
from lcpaq.config import RunConfig
from lcpaq.model.data import load_dataset
from lcpaq.model.demo import DigitsNet
from lcpaq.model.zoo import load_model
from lcpaq.search.context import SearchContext
from lcpaq.search.proxy import ProxyScorer
from lcpaq.search.runner import ceil_budget_mb
from lcpaq.search.slices import head_samples
from lcpaq.search.space import SearchSpace
from lcpaq.stages import pipeline


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> dict[str, Path]:
    """One 5-trial search with a full evaluation of the top 2, shared by the tests below."""
    folder = tmp_path_factory.mktemp("search")
    files = make_files(folder)
    out = folder / "s"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = search_args(files, out, "--eval", str(files["eval"]), "--top-k", "2")
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    return {**files, "out": out}


@pytest.fixture
def no_stage_plots(monkeypatch):
    """Skip the plot stage of best/ (seconds of matplotlib per search) in tests that read no
    figure; `test_search_writes_every_artifact` checks the figures."""
    monkeypatch.setattr(pipeline, "plot", lambda run_dir: [])


def test_search_writes_every_artifact(searched):
    out = searched["out"]
    for name in (
        "best_config.json",
        "trials.csv",
        "trials.json",
        "search_report.md",
        "search_report.json",
        "search.db",
        "plots/proxy_per_trial.png",
        "plots/importances.png",
        "plots/proxy_vs_accuracy.png",
        "best/run_config.json",
        "best/allocation.json",
        "best/quantized/model.safetensors",
        "best/quantized/manifest.json",
        "best/evaluation.json",
        "best/report.md",
        "best/plots/frontiers.png",
    ):
        assert (out / name).is_file(), name
    report = json.loads((out / "search_report.json").read_text())
    trials = json.loads((out / "trials.json").read_text())["trials"]
    scored = [t for t in trials if t["state"] in ("COMPLETE", "PRUNED") and not t["duplicate_of"]]
    assert len(scored) == 5
    # The default configuration is trial 0 and complete; the best is never worse by proxy.
    assert trials[0]["default"] and trials[0]["state"] == "COMPLETE"
    assert report["best"]["proxy"] <= report["default"]["proxy"]
    # Full evaluations: the top 2 by proxy, plus the default when it is not among them.
    assert report["full_evaluations"] == len({*report["top_k"], report["default"]["trial"]})
    assert report["best"]["trial"] in {*report["top_k"], report["default"]["trial"]}
    evaluated = [t for t in trials if t["top1"] is not None]
    # The choice follows the selection rule: the top-1 leader replaces the default unless its
    # paired gain is within the noise, and the report's comparison is that pair's.
    selection = report["selection"]
    top1 = {t["number"]: t["top1"] for t in evaluated}
    assert top1[selection["best_top1_trial"]] == max(top1.values())
    kept = selection["kept_default"]
    assert report["best"]["trial"] == (
        report["default"]["trial"] if kept else selection["best_top1_trial"]
    )
    comparison = report["best_vs_default"]
    assert comparison["best_top1"] == top1[report["best"]["trial"]]
    assert comparison["paired_difference"] == pytest.approx(
        comparison["best_top1"] - comparison["default_top1"]
    )
    assert len(evaluated) == report["full_evaluations"]
    # The best/ run folder evaluated the exported file to the same top-1.
    evaluation = json.loads((out / "best" / "evaluation.json").read_text())
    assert evaluation["quantized"]["top1"] == pytest.approx(report["best"]["top1"])
    # Every trial kept the budget, and the size cap of the default configuration.
    for trial in trials:
        if trial["avg_bits"] is not None:
            assert trial["avg_bits"] <= 4 + 1e-9
            assert trial["size_bytes"] <= report["size_cap_mb"] * 1e6 + 1e-6
    # Every part of a fresh search took time, and the parts add up to at most the process's wall.
    split = report["wall_time_split_s"]
    for name in ("hessian_s", "candidates_s", "ilp_s", "correction_s", "proxy_s", "full_eval_s"):
        assert split[name] > 0, name
    assert sum(split.values()) <= report["this_process_wall_s"]
    assert set(report["importances"]) <= set(SearchSpace.default().names)
    header = (out / "trials.csv").read_text().splitlines()[0].split(",")
    assert {"number", "state", "proxy", "proxy_16", "proxy_48", "clipping", "top1"} <= set(header)


def test_best_config_reproduces_with_lcpaq_run(searched, tmp_path, single_thread, no_stage_plots):
    out = searched["out"]
    config = json.loads((out / "best_config.json").read_text())
    assert any(text.startswith("avg-bits=") for text in config["allocation"]["budgets"])
    rerun = tmp_path / "rerun"
    args = ["-q", "run", "--config", str(out / "best_config.json"), "--out", str(rerun)]
    assert main([*args, "--sweep-points", "0"]) == 0
    ours = json.loads((rerun / "allocation.json").read_text())
    best = json.loads((out / "best" / "allocation.json").read_text())
    assert ours["assignment"] == best["assignment"]
    assert json.loads((rerun / "run_config.json").read_text()) == json.loads(
        (out / "best" / "run_config.json").read_text()
    )


def test_exported_best_scores_the_trial_proxy(searched):
    """The proxy of the file in best/quantized equals the proxy the search gave that trial:
    the search's cached weights and correction are the export stage's."""
    out = searched["out"]
    report = json.loads((out / "search_report.json").read_text())
    reference = load_model("demo-digits", str(searched["checkpoint"])).eval()
    quantized = load_quantized(out / "best" / "quantized", DigitsNet())
    data = load_dataset(str(searched["calib"]), normalization="none", num_classes=10)
    start, stop = report["slices"]["proxy"]
    scorer = ProxyScorer.build("kl", reference, data.subset(start, stop))
    value = scorer.value(scorer.sums(quantized, 0, stop - start), stop - start)
    assert value == pytest.approx(report["best"]["proxy"], rel=1e-6)


def test_proxy_slice_is_disjoint_from_curvature_and_correction(searched):
    report = json.loads((searched["out"] / "search_report.json").read_text())
    head_start, head_stop = report["slices"]["curvature_and_correction"]
    proxy_start, proxy_stop = report["slices"]["proxy"]
    assert (head_start, head_stop) == (0, HEAD)
    assert (proxy_start, proxy_stop) == (NUM_IMAGES - 48, NUM_IMAGES)
    assert head_stop <= proxy_start
    assert not (searched["out"] / "trials").exists()  # trials run in memory
    for name in ("best_config.json", "best/run_config.json"):
        config = RunConfig.from_dict(json.loads((searched["out"] / name).read_text()))
        assert head_samples(config) <= proxy_start


def test_resume_after_interruption_continues_the_same_study(
    tmp_path, monkeypatch, single_thread, no_stage_plots
):
    files = make_files(tmp_path)
    out = tmp_path / "s"
    fixed = ["--fix", "granularity=channel", "--fix", "formats=int-pow2", "--fix", "scorer=hawq_v2"]
    original_prepare = SearchContext.prepare
    calls = {"prepare": 0, "analyze": 0}

    def interrupted(self, config, **kwargs):
        calls["prepare"] += 1
        if calls["prepare"] == 3:
            raise KeyboardInterrupt
        return original_prepare(self, config, **kwargs)

    monkeypatch.setattr(SearchContext, "prepare", interrupted)
    assert main(search_args(files, out, *fixed, trials=4)) == 130
    study = study_of(out)
    states = [trial.state for trial in study.trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 1  # the interrupted trial
    scored_before = [
        t.number for t in study.trials if t.state.is_finished() and t.value is not None
    ]
    # A trial left RUNNING by a process that was killed (its pid no longer exists).
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    stale = study.ask()
    stale.set_user_attr("worker", f"{socket.gethostname()}:{int(dead.stdout)}")

    monkeypatch.setattr(SearchContext, "prepare", original_prepare)
    original_analyze = pipeline.analyze

    def counting_analyze(*args, **kwargs):
        calls["analyze"] += 1
        return original_analyze(*args, **kwargs)

    monkeypatch.setattr(pipeline, "analyze", counting_analyze)
    assert main(search_args(files, out, *fixed, "--resume", trials=4)) == 0
    assert calls["analyze"] == 0  # the curvature came from cache/ on disk
    study = study_of(out)
    by_number = {trial.number: trial for trial in study.trials}
    assert by_number[stale.number].state == optuna.trial.TrialState.FAIL
    scored = [
        t
        for t in study.trials
        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        and "duplicate_of" not in t.user_attrs
    ]
    assert len(scored) == 4
    assert {t.number for t in scored} >= set(scored_before)
    assert max(t.number for t in scored) > stale.number  # new trials came after the stale one
    assert (out / "best_config.json").is_file()


def test_configurations_with_the_same_quantized_model_share_its_proxy(
    tmp_path, single_thread, no_stage_plots
):
    """At 8 average bits every configuration allocates INT8 everywhere: one quantized model, so
    only the first trial builds it and runs the proxy; the others reuse its sums."""
    files = make_files(tmp_path)
    out = tmp_path / "s"
    args = search_args(files, out, trials=4)
    args[args.index("avg-bits=4")] = "avg-bits=8"
    args += ["--fix", "formats=int-pow2", "--fix", "clipping=minmax", "--fix", "symmetric=false"]
    args += ["--fix", "granularity=channel", "--fix", "cost_weight=0", "--size-cap", "none"]
    args += ["--fix", "rounding=nearest"]
    assert main(args) == 0
    trials = [t for t in study_of(out).trials if "duplicate_of" not in t.user_attrs]
    assert len(trials) == 4
    assert len({t.user_attrs["model_key"] for t in trials}) == 1
    first, others = trials[0], trials[1:]
    assert "correction_s" in first.user_attrs
    for trial in others:
        assert trial.user_attrs["same_model_as"] == first.number
        assert "correction_s" not in trial.user_attrs and trial.user_attrs["proxy_s"] == 0
        assert trial.intermediate_values == first.intermediate_values
        assert trial.value == first.value


def test_search_with_activation_formats_end_to_end(tmp_path, single_thread, no_stage_plots):
    """A whole search with quantized activations: the default's size cap, the trials and best/
    measure the activation sensitivity through the cache; best/'s checkpoint quantizes inputs."""
    files = make_files(tmp_path)
    out = tmp_path / "s"
    assert main(search_args(files, out, "--fix", "act_formats=int8", trials=2)) == 0
    assert len(list((out / "cache").glob("activations-n*.npz"))) == 1
    assert (out / "best" / "activations.npz").is_file()
    manifest = json.loads((out / "best" / "quantized" / "manifest.json").read_text())
    assert {entry["activation_quantizer"]["format"] for entry in manifest["layers"]} == {"int8"}
    config = json.loads((out / "best_config.json").read_text())
    assert config["analysis"]["act_formats"] == ["int8"]


def test_size_cap_text_round_trip():
    for size in (20140.0, 123456.7, 1234561.0, 99999999.5):
        cap = ceil_budget_mb(size)
        assert cap * 1e6 >= size
        assert float(f"{cap:g}") == cap


def test_existing_study_without_resume_is_an_error(searched, capsys):
    args = search_args(searched, searched["out"])
    assert_clean_error(capsys, main(args), "already exists", "--resume", "lcpaq-search")


def test_calibration_file_too_small(tmp_path, capsys):
    files = make_files(tmp_path, num_images=60)
    line = assert_clean_error(
        capsys, main(search_args(files, tmp_path / "s")), str(files["calib"]), "60 images"
    )
    assert "80" in line  # 32 head + 48 proxy images
    assert not (tmp_path / "s" / "search.db").exists()


@pytest.mark.parametrize(
    ("option", "needle"),
    [
        (["--fix", "nosuch=1"], "no such search dimension"),
        (["--fix", "clipping=median"], "'median' is not one of"),
        (["--fix", "formats=int2,int99"], "int99"),
        (["--fix", "num_samples"], "NAME=VALUE"),
        (["--proxy-samples", "16,40"], "whole multiple"),
        (["--trials", "0"], "--trials"),
    ],
)
def test_bad_search_options(tmp_path, capsys, option, needle):
    files = make_files(tmp_path)
    assert_clean_error(capsys, main([*search_args(files, tmp_path / "s"), *option]), needle)
