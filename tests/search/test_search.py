"""Proxy search (`lcpaq.search`, ``lcpaq search``): a few-trial search end to end on the (untrained)
demo DigitsNet, resume after an interruption, the caches, the proxy slice, bad input; and the
pieces with exact oracles (candidate arithmetic vs `measure_candidates`, percentile clipping, the
KL proxy, slice planning)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import torch
from safetensors.torch import save_file

from lcpaq import load_quantized, search
from lcpaq.cli import main
from lcpaq.config import AllocationConfig, AnalysisConfig, RunConfig
from lcpaq.errors import InputError
from lcpaq.model.data import Dataset, load_dataset
from lcpaq.model.demo import DigitsNet
from lcpaq.model.evaluate import Accuracy
from lcpaq.model.graph import discover_layers, get_module
from lcpaq.model.recovery import collect_input_hessians
from lcpaq.model.zoo import load_model
from lcpaq.quant.formats import QuantScheme, get_format
from lcpaq.quant.weights import fake_quantize
from lcpaq.search import (
    ProxyScorer,
    SearchSpace,
    candidate_table,
    parse_fix,
    parse_rungs,
    plan_slices,
)
from lcpaq.sensitivity.candidates import measure_candidates
from lcpaq.sensitivity.interaction_terms import load_interactions
from lcpaq.stages import pipeline
from tests.conftest import conv_inputs, make_tiny_conv_net

NUM_IMAGES = 160
RUNGS = "16,48"
HEAD = 32


def _files(folder: Path, num_images: int = NUM_IMAGES) -> dict[str, Path]:
    torch.manual_seed(0)
    model = DigitsNet().eval()
    checkpoint = folder / "net.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    rng = np.random.default_rng(0)
    data = folder / "calib.npz"
    np.savez(
        data,
        x=rng.integers(0, 255, (num_images, 1, 8, 8), dtype=np.uint8),
        y=rng.integers(0, 10, num_images),
    )
    evaluation = folder / "eval.npz"
    np.savez(
        evaluation,
        x=rng.integers(0, 255, (64, 1, 8, 8), dtype=np.uint8),
        y=rng.integers(0, 10, 64),
    )
    return {"checkpoint": checkpoint, "calib": data, "eval": evaluation}


def _search_args(files: dict[str, Path], out: Path, *extra: str, trials: int = 5) -> list[str]:
    return [
        "-q",
        "search",
        "--model",
        "demo-digits",
        "--checkpoint",
        str(files["checkpoint"]),
        "--calib",
        str(files["calib"]),
        "--normalize",
        "none",
        "--budget",
        "avg-bits=4",
        "--trials",
        str(trials),
        "--out",
        str(out),
        "--proxy-samples",
        RUNGS,
        "--fix",
        f"num_samples={HEAD}",
        "--fix",
        f"correction={HEAD}",
        *extra,
    ]


def _digits_config(files: dict[str, Path], **analysis: object) -> RunConfig:
    """The digits model on the test calibration file at 4 average bits."""
    return RunConfig(
        AnalysisConfig(
            model="demo-digits",
            checkpoint=str(files["checkpoint"]),
            calib=str(files["calib"]),
            normalize="none",
            **analysis,  # type: ignore[arg-type]
        ),
        allocation=AllocationConfig(budgets=("avg-bits=4",)),
    )


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> dict[str, Path]:
    """One 5-trial search with a full evaluation of the top 2, shared by the tests below."""
    folder = tmp_path_factory.mktemp("search")
    files = _files(folder)
    out = folder / "s"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = _search_args(files, out, "--eval", str(files["eval"]), "--top-k", "2")
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    return {**files, "out": out}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _assert_clean_error(capsys, code: int, *needles: str) -> str:
    captured = capsys.readouterr()
    assert code == 2
    lines = [line for line in captured.err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("lcpaq: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _study(out: Path, name: str = "lcpaq-search") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{(out / 'search.db').resolve()}")


# ---------------------------------------------------------------------------------------------
# End to end.


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
    assert report["best"]["top1"] >= report["default"]["top1"]
    evaluated = [t for t in trials if t["top1"] is not None]
    assert len(evaluated) == report["full_evaluations"]
    # The best/ run folder evaluated the exported file to the same top-1.
    evaluation = json.loads((out / "best" / "evaluation.json").read_text())
    assert evaluation["quantized"]["top1"] == pytest.approx(report["best"]["top1"])
    # Every trial kept the budget, and the size cap of the default configuration.
    for trial in trials:
        if trial["avg_bits"] is not None:
            assert trial["avg_bits"] <= 4 + 1e-9
            assert trial["size_bytes"] <= report["size_cap_mb"] * 1e6 + 1e-6
    split = report["wall_time_split_s"]
    for name in ("hessian_s", "candidates_s", "ilp_s", "correction_s", "proxy_s", "full_eval_s"):
        assert split[name] >= 0
    assert split["proxy_s"] > 0 and split["full_eval_s"] > 0
    assert set(report["importances"]) <= set(SearchSpace.default().names)
    header = (out / "trials.csv").read_text().splitlines()[0].split(",")
    assert {"number", "state", "proxy", "proxy_16", "proxy_48", "clipping", "top1"} <= set(header)


def test_best_config_reproduces_with_lcpaq_run(searched, tmp_path, one_thread):
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
    for trial_dir in (searched["out"] / "trials").iterdir():
        config = pipeline.read_config(trial_dir)
        assert search.head_samples(config) <= proxy_start


def test_resume_after_interruption_continues_the_same_study(tmp_path, monkeypatch, one_thread):
    files = _files(tmp_path)
    out = tmp_path / "s"
    fixed = ["--fix", "granularity=channel", "--fix", "formats=int-pow2", "--fix", "scorer=hawq_v2"]
    original_prepare = search.SearchContext.prepare
    calls = {"prepare": 0, "analyze": 0}

    def interrupted(self, config, run_dir, **kwargs):
        calls["prepare"] += 1
        if calls["prepare"] == 3:
            raise KeyboardInterrupt
        return original_prepare(self, config, run_dir, **kwargs)

    monkeypatch.setattr(search.SearchContext, "prepare", interrupted)
    assert main(_search_args(files, out, *fixed, trials=4)) == 130
    study = _study(out)
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

    monkeypatch.setattr(search.SearchContext, "prepare", original_prepare)
    original_analyze = pipeline.analyze

    def counting_analyze(*args, **kwargs):
        calls["analyze"] += 1
        return original_analyze(*args, **kwargs)

    monkeypatch.setattr(pipeline, "analyze", counting_analyze)
    assert main(_search_args(files, out, *fixed, "--resume", trials=4)) == 0
    assert calls["analyze"] == 0  # the curvature came from cache/ on disk
    study = _study(out)
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


def test_curvature_is_cached_per_key(tmp_path, monkeypatch, one_thread):
    """One analysis per distinct (samples, loss, seed, ...) key; a new process reloads it."""
    files = _files(tmp_path)
    calls = []
    original = pipeline.analyze

    def counting(config, run_dir, **kwargs):
        calls.append(config.analysis.num_samples)
        return original(config, run_dir, **kwargs)

    monkeypatch.setattr(pipeline, "analyze", counting)
    base = _digits_config(files)
    space = SearchSpace.default().fix({"num_samples": "16", "correction": "16"}, base)
    context = search.SearchContext(base, tmp_path / "s", space, "kl", (16, 48))
    a = base.with_analysis(num_samples=16)
    b = base.with_analysis(num_samples=24)
    # Scheme and formats do not change the curvature: same key.
    c = a.with_analysis(scheme=QuantScheme(symmetric=True), formats=("int2", "int8"))
    folders = [context.curvature(config)[0] for config in (a, b, c, a, b)]
    assert calls == [16, 24]
    assert folders[0] == folders[2] == folders[3] and folders[1] == folders[4] != folders[0]
    again = search.SearchContext(base, tmp_path / "s", space, "kl", (16, 48))
    estimate = again.curvature(b)[1]
    assert calls == [16, 24]
    assert estimate.num_samples == 24
    # Another seed is another key.
    again.curvature(a.with_analysis(seed=1))
    assert calls == [16, 24, 16]
    # Quantized weights: computed once per (scheme, format), reloaded from disk by a new process.
    quantized = []
    original_quantize = search.fake_quantize_formats

    def counting_quantize(weight, fmts, *args, **kwargs):
        quantized.extend(fmt.name for fmt in fmts)
        return original_quantize(weight, fmts, *args, **kwargs)

    monkeypatch.setattr(search, "fake_quantize_formats", counting_quantize)
    first = context.quantized_weights(QuantScheme(), "int3")
    assert len(quantized) == len(first) == 5  # one per layer of DigitsNet
    second = again.quantized_weights(QuantScheme(), "int3")
    assert len(quantized) == 5
    assert all(torch.equal(first[name], second[name]) for name in first)
    again.quantized_weights(QuantScheme(symmetric=True), "int3")
    assert len(quantized) == 10
    # Several formats at once: only the missing ones are computed, each layer's in one call.
    sets = again.quantized_weight_sets(QuantScheme(), ("int2", "int3", "int4"))
    assert quantized[10:] == ["int2", "int4"] * 5
    assert all(torch.equal(sets["int3"][name], first[name]) for name in first)
    assert all(
        torch.equal(sets["int4"][name], again.quantized_weights(QuantScheme(), "int4")[name])
        for name in first
    )
    assert len(quantized) == 20


def test_configurations_with_the_same_quantized_model_share_its_proxy(tmp_path, one_thread):
    """At 8 average bits every configuration allocates INT8 everywhere: one quantized model, so
    only the first trial builds it and runs the proxy; the others reuse its sums."""
    files = _files(tmp_path)
    out = tmp_path / "s"
    args = _search_args(files, out, trials=4)
    args[args.index("avg-bits=4")] = "avg-bits=8"
    args += ["--fix", "formats=int-pow2", "--fix", "clipping=minmax", "--fix", "symmetric=false"]
    args += ["--fix", "granularity=channel", "--fix", "cost_weight=0", "--size-cap", "none"]
    args += ["--fix", "rounding=nearest"]
    assert main(args) == 0
    trials = [t for t in _study(out).trials if "duplicate_of" not in t.user_attrs]
    assert len(trials) == 4
    assert len({t.user_attrs["model_key"] for t in trials}) == 1
    first, others = trials[0], trials[1:]
    assert "correction_s" in first.user_attrs
    for trial in others:
        assert trial.user_attrs["same_model_as"] == first.number
        assert "correction_s" not in trial.user_attrs and trial.user_attrs["proxy_s"] == 0
        assert trial.intermediate_values == first.intermediate_values
        assert trial.value == first.value


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2.


def test_existing_study_without_resume_is_an_error(searched, capsys):
    args = _search_args(searched, searched["out"])
    _assert_clean_error(capsys, main(args), "already exists", "--resume", "lcpaq-search")


def test_resume_without_a_study_is_an_error(tmp_path, capsys):
    files = _files(tmp_path)
    args = _search_args(files, tmp_path / "s", "--resume", "--study-name", "mine")
    _assert_clean_error(capsys, main(args), "no study 'mine'")


def test_calibration_file_too_small(tmp_path, capsys):
    files = _files(tmp_path, num_images=60)
    line = _assert_clean_error(
        capsys, main(_search_args(files, tmp_path / "s")), str(files["calib"]), "60 images"
    )
    assert "80" in line  # 32 head + 48 proxy images
    assert not (tmp_path / "s" / "search.db").exists()


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("nosuchdb://x", "nosuchdb"),
        ("not a url", "not a url"),
        ("sqlite:////nonexistent/dir/x.db", "x.db"),
    ],
)
def test_bad_storage(tmp_path, capsys, url, needle):
    files = _files(tmp_path)
    args = _search_args(files, tmp_path / "s", "--storage", url)
    _assert_clean_error(capsys, main(args), "--storage", needle)


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
    files = _files(tmp_path)
    _assert_clean_error(capsys, main([*_search_args(files, tmp_path / "s"), *option]), needle)


# ---------------------------------------------------------------------------------------------
# Pieces, with exact oracles.


@pytest.mark.parametrize(
    "scheme",
    [
        QuantScheme(),
        QuantScheme(symmetric=True, clipping="minmax"),
        QuantScheme(granularity="group", group_size=32, clipping="percentile", percentile=99.0),
        QuantScheme(granularity="tensor", clipping="percentile", percentile=99.99),
    ],
)
def test_candidate_table_from_cached_weights_equals_measure_candidates(scheme):
    model = make_tiny_conv_net()
    layers = discover_layers(model, conv_inputs(4))
    formats = ("int2", "int4", "int8", "fp4_e2m1")
    rng = np.random.default_rng(0)
    diagonal = {layer.name: rng.random(layer.weight_shape) for layer in layers}
    hessians = collect_input_hessians(model, [layer.name for layer in layers], conv_inputs(4))
    expected = measure_candidates(model, layers, formats, scheme, diagonal, (), hessians)
    weights = {layer.name: get_module(model, layer.name).weight.detach() for layer in layers}
    quantized = {
        name: {
            key: fake_quantize(value, get_format(name), scheme) for key, value in weights.items()
        }
        for name in formats
    }
    table = candidate_table(layers, weights, quantized, formats, scheme, diagonal, (), hessians)
    assert np.isfinite(table.output_error).all()
    fields = ("error_sq", "weighted_error", "output_error", "weight_bits", "size_bits", "bits")
    for field in (*fields, "num_params"):
        np.testing.assert_array_equal(getattr(table, field), getattr(expected, field))
    assert table.format_names == expected.format_names


def test_percentile_clipping_oracles():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 50, generator=generator)
    weight[0, 3] = 40.0  # an outlier the percentile cuts off
    int4 = get_format("int4")
    for symmetric in (False, True):
        for granularity in ("tensor", "channel", "group"):
            args = {"symmetric": symmetric, "granularity": granularity, "group_size": 32}
            full = fake_quantize(
                weight, int4, QuantScheme(clipping="percentile", percentile=100.0, **args)
            )
            minmax = fake_quantize(weight, int4, QuantScheme(clipping="minmax", **args))
            assert torch.equal(full, minmax)  # p = 100 is min-max
    # Symmetric per channel: the scale is P_p(|w|) / 7, numpy's linear percentile of each row.
    scheme = QuantScheme(symmetric=True, clipping="percentile", percentile=95.0)
    from lcpaq.quant.weights import quantize_weight

    scale = quantize_weight(weight, int4, scheme).scale
    expected = np.percentile(weight.abs().numpy().astype(np.float64), 95.0, axis=1) / 7
    np.testing.assert_allclose(scale.numpy(), expected, rtol=1e-6)
    assert float(scale[0]) < 5.0 / 7  # the outlier no longer sets row 0's scale
    # Groups of 32 over 50 inputs: the padded second group uses its 18 real elements only.
    grouped = QuantScheme(
        symmetric=True, granularity="group", group_size=32, clipping="percentile", percentile=90.0
    )
    scale = quantize_weight(weight, int4, grouped).scale
    tail = np.percentile(weight[:, 32:].abs().numpy().astype(np.float64), 90.0, axis=1) / 7
    np.testing.assert_allclose(scale[:, 1].numpy(), tail, rtol=1e-6)
    with pytest.raises(InputError, match="percentile"):
        QuantScheme(clipping="percentile", percentile=40.0)


def test_kl_proxy_oracle():
    model = make_tiny_conv_net()
    inputs = conv_inputs(12)
    labels = torch.zeros(12, dtype=torch.long)
    data = Dataset(inputs, labels, "tiny")
    scorer = ProxyScorer.build("kl", model, data)
    assert scorer.value(scorer.sums(model, 0, 12), 12) == pytest.approx(0.0, abs=1e-12)
    other = make_tiny_conv_net(seed=3)
    with torch.no_grad():
        p = torch.softmax(model(inputs).double(), 1)
        q = torch.softmax(other(inputs).double(), 1)
    expected = float((p * (p.log() - q.log())).sum(1).mean())
    sums = scorer.sums(other, 0, 5) + scorer.sums(other, 5, 12)  # slices add up
    assert scorer.value(sums, 12) == pytest.approx(expected, rel=1e-6)
    sqnr = ProxyScorer.build("sqnr", model, data)
    with torch.no_grad():
        y, e = model(inputs).double(), model(inputs).double() - other(inputs).double()
    expected_db = -10 * np.log10(float(y.pow(2).sum()) / float(e.pow(2).sum()))
    assert sqnr.value(sqnr.sums(other, 0, 12), 12) == pytest.approx(expected_db, rel=1e-6)


def test_slices_and_option_parsing():
    assert parse_rungs("128,384,1152") == (128, 384, 1152)
    assert parse_rungs("500") == (500,)
    for bad in ("128,300", "128,384,1000", "0", "a,b"):
        with pytest.raises(InputError):
            parse_rungs(bad)
    slices = plan_slices(5085, (128, 384, 1152), 1024, "calib.npz")
    assert slices.proxy_start == 5085 - 1152 and slices.head == 1024
    with pytest.raises(InputError, match="calib.npz has 2000 images"):
        plan_slices(2000, (128, 384, 1152), 1024, "calib.npz")
    assert parse_fix(["formats=int-pow2", "correction=off"]) == {
        "formats": "int-pow2",
        "correction": "off",
    }


def test_space_maps_to_pipeline_options():
    base = RunConfig(
        AnalysisConfig(model="m", checkpoint=None, calib="c"),
        allocation=AllocationConfig(budgets=("avg-bits=3", "size-mb=0.2")),
    )
    space = SearchSpace.default()
    default = space.config(base, space.default_params())
    assert default == base  # the enqueued default is lcpaq's default configuration
    params = {
        "num_samples": 512,
        "clipping": "p99.9",
        "symmetric": True,
        "granularity": "group64",
        "formats": "int+fp4",
        "first_last": "keep-8bit",
        "scorer": "diagonal",
        "correction": "off",
        "cost_weight": 0.01,
        "estimator": "gauss-newton",
        "rounding": "gptq-damp0.1",
    }
    config = space.config(base, params)
    assert config.analysis.num_samples == 512
    assert config.analysis.scheme == QuantScheme(
        symmetric=True,
        granularity="group",
        group_size=64,
        clipping="percentile",
        percentile=99.9,
        rounding="gptq",
        gptq_damp=0.1,
    )
    nearest = space.config(base, {**params, "rounding": "nearest"}).analysis.scheme
    assert nearest.rounding == "nearest"
    assert "fp4_e2m1" in config.analysis.formats
    assert config.allocation.first_last == "keep-8bit" and config.allocation.scorer == "diagonal"
    assert not config.recovery.enabled
    assert config.allocation.cost_weights == (("avg-bits", 0.01),)  # λ on the first budget
    assert config.allocation.budgets == base.allocation.budgets
    assert search.space_head(space, base) == 1024
    fixed = space.fix({"correction": "64", "num_samples": "48"}, base)
    assert search.space_head(fixed, base) == 64
    assert fixed.size == space.size // (4 * 4)
    # Optional dimensions (the Hutchinson estimator) are pinned unless asked for.
    assert space.dimension("estimator").choices == ("gauss-newton",)
    wider = SearchSpace.default(also=["estimator"])
    assert wider.size == 3 * space.size
    hutchinson = wider.config(base, {**params, "estimator": "hutchinson-64"})
    assert hutchinson.analysis.estimator == "hutchinson"
    assert hutchinson.analysis.hutchinson_probes == 64
    with pytest.raises(InputError, match="--also nosuch"):
        SearchSpace.default(also=["nosuch"])
    # Pairwise terms: opt-in; with a cost weight they enter the ILP exactly (no augmented score).
    assert space.dimension("pairwise").choices == ("none",)
    paired = SearchSpace.default(also=["pairwise"])
    windowed = paired.config(base, {**params, "cost_weight": 0.0, "pairwise": "gn-w2"})
    assert windowed.analysis.pairwise == "gauss-newton" and windowed.analysis.pair_window == 2
    assert windowed.allocation.pairwise_mode == "augmented"
    weighted = paired.config(base, {**params, "pairwise": "gn-w1"})
    assert weighted.allocation.pairwise_mode == "ilp"
    assert weighted.allocation.pair_clip == "negative"
    assert paired.config(base, {**params, "pairwise": "none"}).analysis.pairwise == "none"


def test_pairwise_terms_are_cached_per_scheme_and_reach_the_trial_folder(
    tmp_path, monkeypatch, one_thread
):
    files = _files(tmp_path)
    calls = []
    original = pipeline.analyze_interactions

    def counting(config, *args, **kwargs):
        if config.analysis.pairwise != "none":  # ``analyze`` of the curvature cache calls it too
            calls.append(config.analysis.pair_window)
        return original(config, *args, **kwargs)

    monkeypatch.setattr(pipeline, "analyze_interactions", counting)
    base = _digits_config(files, num_samples=16, pair_samples=16, batch_size=8)
    base = replace(base, recovery=search.RecoveryConfig(enabled=False))
    space = SearchSpace.default(also=["pairwise"]).fix({"num_samples": "16"}, base)
    space = space.fix({"correction": "off"}, base)
    context = search.SearchContext(base, tmp_path / "s", space, "kl", (16, 48))
    w1 = space.config(base, {**space.default_params(), "pairwise": "gn-w1"})
    first = context.prepare(w1, tmp_path / "t1", build=False)
    again = context.prepare(w1, tmp_path / "t2", build=False)
    assert calls == [1]  # the second trial reuses the cached terms
    assert first.timings["hessian_s"] > 0 and again.timings["hessian_s"] == 0
    for folder in ("t1", "t2"):
        terms = load_interactions(tmp_path / folder / "interactions.npz")
        assert terms.pairs == tuple((i, i + 1) for i in range(4))
    context.prepare(w1.with_analysis(pair_window=2), tmp_path / "t3", build=False)
    other_scheme = w1.with_analysis(scheme=QuantScheme(symmetric=True))
    context.prepare(other_scheme, tmp_path / "t4", build=False)
    assert calls == [1, 2, 1]
    none = context.prepare(base, tmp_path / "t5", build=False)
    assert not (tmp_path / "t5" / "interactions.npz").exists()
    assert none.allocation.formats


def test_activation_formats_are_cached_and_quantize_the_trial_model(
    tmp_path, monkeypatch, one_thread
):
    """``--also act_formats``: the activation sensitivity and ranges are measured once per
    (images, formats, clipping), reach the trial folder, and the trial's model quantizes its
    layer inputs exactly as ``export`` of that folder does."""
    files = _files(tmp_path)
    calls = []
    original = pipeline.measure_activations

    def counting(config, *args, **kwargs):
        calls.append((config.analysis.act_formats, config.analysis.act_clipping))
        return original(config, *args, **kwargs)

    monkeypatch.setattr(pipeline, "measure_activations", counting)
    base = _digits_config(files, num_samples=16, batch_size=8)
    space = SearchSpace.default(also=["act_formats", "act_clipping"])
    space = space.fix({"num_samples": "16", "correction": "16"}, base)
    assert space.dimension("act_formats").choices == tuple(search.ACTIVATION_SETS)
    context = search.SearchContext(base, tmp_path / "s", space, "kl", (16, 48))
    a4 = space.config(base, {**space.default_params(), "act_formats": "int4"})
    assert a4.analysis.act_formats == ("int4",) and a4.analysis.act_clipping == "mse"
    first = context.prepare(a4, tmp_path / "t1")
    again = context.prepare(a4, tmp_path / "t2", build=False)
    assert calls == [(("int4",), "mse")]
    assert again.timings["hessian_s"] == 0
    assert all(name.endswith("/int4") for name in first.allocation.formats)
    assert (tmp_path / "t2" / "activations.npz").is_file()
    pipeline.export(tmp_path / "t1")
    manifest = json.loads((tmp_path / "t1" / "quantized" / "manifest.json").read_text())
    assert all(entry["activation_quantizer"]["format"] == "int4" for entry in manifest["layers"])
    loaded = load_quantized(tmp_path / "t1" / "quantized", DigitsNet())
    inputs = context.calib.inputs[:32]
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), first.quantized(inputs))
    weights_only = context.prepare(base, tmp_path / "t3", build=False)
    assert not (tmp_path / "t3" / "activations.npz").exists()
    assert search.model_key(a4, first.allocation) != search.model_key(base, weights_only.allocation)
    minmax = a4.with_analysis(act_clipping="minmax")
    assert search.curvature_key(minmax, {}) == search.curvature_key(a4, {})
    context.prepare(minmax, tmp_path / "t4", build=False)
    assert calls == [(("int4",), "mse"), (("int4",), "minmax")]
    assert search.model_key(minmax, first.allocation) != search.model_key(a4, first.allocation)
    with pytest.raises(InputError, match="unknown activation format 'int9'"):
        space.fix({"act_formats": "int9"}, base)


def test_search_with_activation_formats_end_to_end(tmp_path, one_thread):
    """A whole search with quantized activations: the default's size cap, the trials and best/
    measure the activation sensitivity through the cache; best/'s checkpoint quantizes inputs."""
    files = _files(tmp_path)
    out = tmp_path / "s"
    assert main(_search_args(files, out, "--fix", "act_formats=int8", trials=2)) == 0
    assert len(list((out / "cache").glob("activations-n*.npz"))) == 1
    assert (out / "best" / "activations.npz").is_file()
    manifest = json.loads((out / "best" / "quantized" / "manifest.json").read_text())
    assert {entry["activation_quantizer"]["format"] for entry in manifest["layers"]} == {"int8"}
    config = json.loads((out / "best_config.json").read_text())
    assert config["analysis"]["act_formats"] == ["int8"]


def test_budgets_that_count_activation_bits_quantize_the_inputs_of_every_configuration(tmp_path):
    """Under BitOps (or EBOPs, latency) a weights-only checkpoint would keep FP32 activations
    that the cost counts as 8-bit: the default and every trial get real INT8 inputs instead,
    unless --fix or --also act_formats says otherwise; avg-bits/size budgets are untouched."""
    base = RunConfig(
        AnalysisConfig(model="m", checkpoint=None, calib="c"),
        allocation=AllocationConfig(budgets=("bitops-g=0.6",)),
    )

    def space(**options):
        return search.search_space(search.SearchOptions(base=base, out=tmp_path, **options))

    pinned = space().dimension("act_formats")
    assert pinned.choices == ("int8",) and pinned.default == "int8"
    searched = space(also=("act_formats",)).dimension("act_formats")
    assert searched.choices == tuple(search.ACTIVATION_SETS) and searched.default == "int8"
    assert space(fixed={"act_formats": "int4-8"}).dimension("act_formats").choices == ("int4-8",)
    assert space(fixed={"act_formats": "none"}).dimension("act_formats").default == "none"
    weights_only = replace(base, allocation=AllocationConfig(budgets=("avg-bits=3",)))
    options = search.SearchOptions(base=weights_only, out=tmp_path)
    assert search.search_space(options).dimension("act_formats").default == "none"
    with pytest.raises(InputError, match="no such search dimension"):
        SearchSpace.default().with_default("nosuch", 1)


def test_size_cap_text_round_trip():
    for size in (20140.0, 123456.7, 1234561.0, 99999999.5):
        cap = search._ceil_budget_mb(size)
        assert cap * 1e6 >= size
        assert float(f"{cap:g}") == cap


def test_default_is_kept_unless_the_best_beats_it_beyond_the_noise():
    """The selection rule: a gain within min_gain_se paired SE keeps the default."""

    def accuracy(correct: list[int]) -> Accuracy:
        values = np.array(correct, dtype=bool)
        return Accuracy(float(values.mean()), 0.0, len(values), values)

    trial = SimpleNamespace  # the rule reads only .number
    default, best = trial(number=0), trial(number=7)
    base = np.array([1, 0] * 50)
    better = base.copy()
    better[[1, 3]] = 1  # +2 points on 100 images: 1.4 paired SE
    evaluations = {0: accuracy(list(base)), 7: accuracy(list(better))}
    rule = search.Search._unless_within_noise
    strict = SimpleNamespace(options=SimpleNamespace(min_gain_se=2.0))
    lenient = SimpleNamespace(options=SimpleNamespace(min_gain_se=1.0))
    assert rule(strict, best, default, evaluations) is default
    assert rule(lenient, best, default, evaluations) is best
    assert rule(strict, best, None, evaluations) is best  # no default evaluated: nothing to keep
    assert rule(strict, default, default, evaluations) is default
    with pytest.raises(InputError, match="min-gain-se"):
        search.SearchOptions(
            base=RunConfig(AnalysisConfig("m", None, "c")), out=Path("o"), min_gain_se=-1
        )


@pytest.mark.parametrize("change", ["calib", "normalize"])
def test_gptq_caches_follow_the_calibration_images(tmp_path, one_thread, change):
    """GPTQ weights depend on the input second moments, hence on the calibration images and
    their normalisation: a second search in the same folder on other images must recompute."""
    files = _files(tmp_path)
    other = tmp_path / "calib2.npz"
    rng = np.random.default_rng(5)
    np.savez(
        other,
        x=rng.integers(0, 255, (NUM_IMAGES, 1, 8, 8), dtype=np.uint8),
        y=rng.integers(0, 10, NUM_IMAGES),
    )
    variants = (
        [_digits_config(files), _digits_config({**files, "calib": other})]
        if change == "calib"
        else [_digits_config(files), _digits_config(files).with_analysis(normalize="0.5/0.25")]
    )
    scheme = QuantScheme(rounding="gptq")
    for base in variants:
        space = SearchSpace.default().fix({"num_samples": "16", "correction": "16"}, base)
        context = search.SearchContext(base, tmp_path / "s", space, "kl", (16, 48))
        context.curvature(base.with_analysis(num_samples=16))
        weights = context.quantized_weights(scheme, "int3", 16)
        hessians = context.input_hessians(base.with_analysis(scheme=scheme, num_samples=16))
        names = list(weights)
        expected = collect_input_hessians(
            context.model, names, context.calib.inputs[:16], batch_size=base.analysis.batch_size
        )
        for name in names:
            torch.testing.assert_close(hessians[name], expected[name])
            fresh = fake_quantize(
                context.fp_weights[name], get_format("int3"), scheme, expected[name]
            )
            assert torch.equal(weights[name], fresh)
