"""The stages end to end on the tiny digits model: `pipeline.run` writes every artifact of
`pipeline.ORDER` into a run folder, the stages can be re-run alone, and the functions over data
(`analyze_model`, `problem_of`, `export_model`) give what their run-folder wrappers wrote."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ALLOCATED_RUN_FILES, read_png, write_digits_files

from lcpaq import runfolder
from lcpaq.allocation.budgets import parse_budget
from lcpaq.config import AnalysisConfig, RecoveryConfig, RunConfig
from lcpaq.model.graph import discover_layers
from lcpaq.stages import pipeline
from lcpaq.stages.allocate import ProblemData, optimum, problem_of
from lcpaq.stages.analyze import analyze_model
from lcpaq.stages.export import export_model
from lcpaq.stages.folder import load_model_and_data


def _config(folder: Path) -> RunConfig:
    checkpoint, data = write_digits_files(folder, num_images=48)
    return RunConfig(
        analysis=AnalysisConfig(
            model="demo-digits",
            checkpoint=str(checkpoint),
            calib=str(data),
            normalize="none",
            num_samples=32,
            batch_size=16,
            formats=("int2", "int4", "int8"),
        ),
        recovery=RecoveryConfig(num_samples=32),
    ).with_allocation(budgets=("avg-bits=4",))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, Path]:
    """One run of every stage (the analysis is the slow part; the tests below share it)."""
    folder = tmp_path_factory.mktemp("pipeline")
    config = _config(folder)
    run_dir = folder / "run"
    report = pipeline.run(
        config, run_dir, eval_path=config.analysis.calib, sweep_points=4, progress=False
    )
    assert report == run_dir / "report.md"
    return config, run_dir


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_run_writes_every_stage_in_order(finished_run) -> None:
    _, run_dir = finished_run
    names = {
        *ALLOCATED_RUN_FILES,
        "evaluation.json",
        "sweep.json",
        "report.md",
        "report.json",
        "timings.json",
        "input_hessians.safetensors",  # the default scheme rounds with GPTQ
    }
    assert names <= {path.name for path in run_dir.iterdir()}
    timings = _json(run_dir / "timings.json")
    # Every stage but the report, which shows the timings, records its wall time, in order.
    assert [stage for stage in timings if stage != "schema_version"] == list(pipeline.ORDER[:-1])
    allocation = _json(run_dir / "allocation.json")
    assert allocation["average_bits"] <= 4 + 1e-9
    assert set(allocation["formats"]) <= {"int2", "int4", "int8"}
    manifest = _json(run_dir / "quantized" / "manifest.json")
    assert manifest["budget"] == ["avg-bits=4"]
    assert manifest["totals"]["average_bits"] == allocation["average_bits"]


def test_sweep_curve_trades_bits_for_predicted_loss(finished_run) -> None:
    _, run_dir = finished_run
    sweep = _json(run_dir / "sweep.json")
    points = sweep["curves"]["avg-bits"]
    assert points == sweep["points"]
    bits = [point["avg_bits"] for point in points]
    losses = [point["predicted_loss_increase"] for point in points]
    assert bits == sorted(bits) and len(points) >= 2
    # More bits never predict a larger loss: each point is an optimum at a looser budget.
    assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:]))
    assert {point["format"] for point in sweep["uniform"]} >= {"int2", "int4", "int8"}
    # By default run measures no sweep point: the exported allocation's point takes the top-1
    # that evaluate measured, every other point is predicted only.
    evaluation = _json(run_dir / "evaluation.json")["quantized"]
    chosen = _json(run_dir / "allocation.json")["formats"]
    everything = points + sweep["uniform"]
    reused = [
        point
        for point in everything
        if point.get("formats", [point.get("format")] * len(chosen)) == chosen
    ]
    assert reused, "the allocation's budget is on the curve"
    for point in everything:
        if point in reused:
            assert (point["top1"], point["top1_stderr"]) == (
                evaluation["top1"],
                evaluation["stderr"],
            )
            assert point["eval_images"] == evaluation["num_samples"]
        else:
            assert point.get("top1") is None


def test_sweep_measures_points_on_a_subset_as_export_does(finished_run, tmp_path) -> None:
    """--sweep-eval-samples N: every point measured on the first N images with its binomial
    standard error; its top-1 is what quantize_and_recover + evaluate give on those images
    (the shared weight cache changes nothing)."""
    import shutil

    from lcpaq.model.evaluate import evaluate_accuracy
    from lcpaq.stages.export import quantize_and_recover
    from lcpaq.stages.folder import load_eval, read_input_hessians, read_layers

    config, original = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(original, run_dir)
    eval_path = config.analysis.calib
    sweep = pipeline.sweep(run_dir, eval_path, num_points=3, eval_samples=16, progress=False)
    uniform = {point["format"]: point for point in sweep["uniform"]}
    for point in [*sweep["points"], *uniform.values()]:
        assert point["eval_images"] in (16, 48)  # 48: the allocation's, from evaluation.json
        p = point["top1"]
        expected = np.sqrt(p * (1 - p) / point["eval_images"])
        assert point["top1_stderr"] == pytest.approx(expected)
    measured = next(name for name, point in uniform.items() if point["eval_images"] == 16)
    model, calib = load_model_and_data(config, config.recovery.num_samples)
    layers, _ = read_layers(run_dir)
    quantized, _ = quantize_and_recover(
        model,
        layers,
        {layer.name: measured for layer in layers},
        config,
        calib.inputs,
        input_hessians=read_input_hessians(run_dir, config),
    )
    subset = load_eval(config, model, eval_path).subset(0, 16)
    assert uniform[measured]["top1"] == evaluate_accuracy(quantized, subset).top1


def test_report_and_figures_show_the_allocation(finished_run) -> None:
    _, run_dir = finished_run
    report = _json(run_dir / "report.json")
    allocation = _json(run_dir / "allocation.json")
    evaluation = _json(run_dir / "evaluation.json")
    assert [row["format"] for row in report["layers"]] == allocation["formats"]
    assert report["evaluation"]["quantized"]["top1"] == evaluation["quantized"]["top1"]
    text = (run_dir / "report.md").read_text()
    assert "budget: avg-bits=4;" in text
    assert f"average weight bits: {allocation['average_bits']:.3f}" in text
    assert "### Over avg-bits" in text
    plots = {path.name for path in (run_dir / "plots").iterdir()}
    assert plots == {
        "frontiers.png",
        "candidate_heatmap.png",
        "bit_allocation.png",
        "model_curve.png",
    }
    for name in plots:
        read_png(run_dir / "plots" / name)


def test_allocate_alone_leaves_the_analysis(finished_run, tmp_path) -> None:
    _, run_dir = finished_run
    curvature = (run_dir / "curvature.npz").read_bytes()
    tighter = pipeline.allocate(run_dir, [parse_budget("avg-bits=3")])
    assert tighter.average_bits <= 3 + 1e-9
    assert _json(run_dir / "allocation.json")["average_bits"] == tighter.average_bits
    assert (run_dir / "curvature.npz").read_bytes() == curvature
    loose = pipeline.allocate(run_dir, [parse_budget("avg-bits=4")])
    assert loose.predicted_loss_increase <= tighter.predicted_loss_increase


def test_functions_over_data_match_the_run_folder(finished_run) -> None:
    """analyze_model → problem_of → optimum → export_model in memory give the files' numbers."""
    config, run_dir = finished_run
    model, calib = load_model_and_data(config, config.analysis.num_samples)
    layers = discover_layers(model, calib.inputs)
    analysis = analyze_model(config, model, layers, calib, progress=False)
    table = runfolder.load_candidates(run_dir / "candidates.npz")
    np.testing.assert_array_equal(analysis.candidates.error_sq, table.error_sq)
    curvature = runfolder.load_curvature(run_dir / "curvature.npz")
    np.testing.assert_array_equal(analysis.measurements.curvature.trace, curvature.trace)
    data = ProblemData.of_analysis(analysis, config.analysis.scheme.symmetric)
    problem, scores, _ = problem_of(data)
    np.testing.assert_array_equal(
        scores, runfolder.read_npz(run_dir / "frontiers.npz", "")["scores"]
    )
    allocation = optimum(problem, [parse_budget("avg-bits=4")])
    assert list(allocation.formats) == _json(run_dir / "allocation.json")["formats"]
    quantized = export_model(
        model,
        layers,
        allocation,
        config,
        calib.inputs,
        input_hessians=analysis.input_hessians,
    )
    from lcpaq import load_quantized
    from lcpaq.model.demo import DigitsNet

    loaded = load_quantized(run_dir / "quantized", DigitsNet())
    assert isinstance(loaded, torch.nn.Module)
    with torch.no_grad():
        torch.testing.assert_close(quantized.model(calib.inputs), loaded(calib.inputs))


def test_a_new_analysis_removes_what_was_derived_from_the_old_one(finished_run, tmp_path) -> None:
    config, _ = finished_run
    run_dir = tmp_path / "run"
    pipeline.analyze(config, run_dir, progress=False)
    pipeline.allocate(run_dir, [parse_budget("avg-bits=4")])
    pipeline.export(run_dir)
    assert (run_dir / "allocation.json").is_file() and (run_dir / "quantized").is_dir()
    pipeline.analyze(config, run_dir, progress=False)
    assert not (run_dir / "allocation.json").exists()
    assert not (run_dir / "quantized").exists()
    assert set(_json(run_dir / "timings.json")) == {"schema_version", "analyze"}
