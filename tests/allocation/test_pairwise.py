"""Inter-layer terms in the allocation (`lcpaq.allocation.pairwise`) and through the pipeline and CLI: the
stored terms reload exactly, the ILP with pairs equals brute force on a tiny model's run folder,
the significance filter, λ and clipping, the augmented score, the heatmap and the CLI flags."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import digits_command, write_digits_files

from lcpaq import runfolder
from lcpaq.allocation.budgets import Budget
from lcpaq.allocation.frontier import score_candidates
from lcpaq.allocation.objective import objective_value
from lcpaq.allocation.pairwise import (
    AugmentedProblem,
    align_terms,
    augmented_scores,
    pair_views,
    prepare_pairwise,
    psd_project,
    significant_terms,
)
from lcpaq.allocation.problem import AllocationProblem, allowed_candidates
from lcpaq.allocation.table import CandidateTable
from lcpaq.cli import main
from lcpaq.config import AllocationConfig, AnalysisConfig, RecoveryConfig, RunConfig
from lcpaq.errors import InputError
from lcpaq.model.data import load_dataset
from lcpaq.model.zoo import load_model
from lcpaq.sensitivity.interaction_terms import InteractionTerms, load_interactions, select_pairs
from lcpaq.sensitivity.interactions import compute_interactions, pair_formats
from lcpaq.stages import pipeline
from lcpaq.stages.heatmaps import plot_interaction_heatmap

pytestmark = pytest.mark.usefixtures("single_thread")


# -- pure functions ----------------------------------------------------------------------------


def _terms(layer_names=("a", "b", "c"), formats=("int2", "int4"), seed=0) -> InteractionTerms:
    rng = np.random.default_rng(seed)
    pairs = select_pairs(len(layer_names), "all")
    size = len(formats)
    return InteractionTerms(
        layer_names=tuple(layer_names),
        format_names=tuple(formats),
        cross={pair: rng.normal(size=(size, size)) for pair in pairs},
        stderr={pair: rng.uniform(0.2, 1.0, size=(size, size)) for pair in pairs},
        diagonal=rng.uniform(0.5, 1.0, size=(len(layer_names), size)),
        diagonal_stderr=np.full((len(layer_names), size), 0.1),
        method="measured",
        num_samples=10,
    )


def test_align_terms_maps_weight_formats_onto_columns() -> None:
    terms = _terms()
    # Paired (weight, activation) columns share the terms of their weight format; int8 was not
    # measured, so its terms are 0 ± 0.
    columns = ("int2", "int2", "int4", "int8")
    cross, stderr = align_terms(terms, ("a", "b", "c"), columns)
    block = terms.cross[(0, 2)]
    expected = np.zeros((4, 4))
    index = [0, 0, 1]
    for r, f in enumerate(index):
        for c, g in enumerate(index):
            expected[r, c] = block[f, g]
    np.testing.assert_array_equal(cross[(0, 2)], expected)
    assert np.all(stderr[(0, 2)][3] == 0) and np.all(stderr[(0, 2)][:, 3] == 0)
    with pytest.raises(InputError, match="other layers"):
        align_terms(terms, ("a", "b", "x"), columns)
    with pytest.raises(InputError, match="int4"):
        align_terms(terms, ("a", "b", "c"), ("int2", "int3"))


def test_significance_filter_weight_and_clipping() -> None:
    cross = {(0, 1): np.array([[3.0, -0.5], [-3.0, 1.9]])}
    stderr = {(0, 1): np.array([[1.0, 1.0], [1.0, 1.0]])}
    kept = significant_terms(cross, stderr, 2.0)
    np.testing.assert_array_equal(kept[(0, 1)], [[3.0, 0.0], [-3.0, 0.0]])
    np.testing.assert_array_equal(significant_terms(cross, stderr, 0.0)[(0, 1)], cross[(0, 1)])
    scores = np.ones((2, 2))
    # The filter acts on the raw terms, before λ: a small λ keeps the same entries.
    same_scores, shrunk = prepare_pairwise(scores, cross, stderr, weight=0.1, z=2.0)
    np.testing.assert_allclose(shrunk[(0, 1)], [[0.3, 0.0], [-0.3, 0.0]])
    assert same_scores is scores
    _, clipped = prepare_pairwise(scores, cross, stderr, weight=1.0, z=2.0, clip="negative")
    np.testing.assert_array_equal(clipped[(0, 1)], [[3.0, 0.0], [0.0, 0.0]])
    # Blocks that the filter zeroes entirely are dropped (no ILP variables for them).
    _, none_left = prepare_pairwise(scores, cross, stderr, weight=1.0, z=10.0)
    assert none_left == {}
    with pytest.raises(InputError, match="no standard error"):
        significant_terms(cross, {(0, 1): np.full((2, 2), np.nan)}, 2.0)
    with pytest.raises(InputError, match="pairwise-weight"):
        prepare_pairwise(scores, cross, stderr, weight=-1.0)


def test_psd_projection_is_identity_on_psd_and_removes_negative_eigenvalues() -> None:
    rng = np.random.default_rng(3)
    scores = rng.uniform(1.0, 2.0, size=(3, 2))
    pairs = {(0, 1): rng.normal(scale=0.1, size=(2, 2)), (1, 2): rng.normal(scale=0.1, size=(2, 2))}
    # Small off-diagonal terms next to a dominant diagonal: Ω is already PSD, nothing changes.
    new_scores, new_pairs = psd_project(scores, pairs)
    np.testing.assert_allclose(new_scores, scores, atol=1e-12)
    for pair in pairs:
        np.testing.assert_allclose(new_pairs[pair], pairs[pair], atol=1e-12)
    # A large negative interaction makes Ω indefinite; the projection's Ω is PSD.
    pairs[(0, 1)] = np.array([[-5.0, 0.0], [0.0, 0.0]])
    new_scores, new_pairs = psd_project(scores, pairs)
    omega = np.diag(2 * new_scores.reshape(-1))
    for (i, j), block in new_pairs.items():
        omega[2 * i : 2 * i + 2, 2 * j : 2 * j + 2] = block
        omega[2 * j : 2 * j + 2, 2 * i : 2 * i + 2] = block.T
    assert new_pairs[(0, 1)][0, 0] > -5.0
    # Ω restricted to the kept entries is the projection minus the dropped within-layer entries;
    # its quadratic form over one-hot vectors equals 2·(Σ s + Σ C) by construction.
    choice = np.array([0, 1, 0])
    x = np.zeros(6)
    x[np.arange(3) * 2 + choice] = 1
    np.testing.assert_allclose(x @ omega @ x, 2 * objective_value(new_scores, new_pairs, choice))


def test_augmented_score_is_the_coordinate_wise_objective() -> None:
    rng = np.random.default_rng(5)
    scores = rng.normal(size=(4, 3))
    pairs = {(0, 1): rng.normal(size=(3, 3)), (1, 3): rng.normal(size=(3, 3))}
    reference = np.array([2, 0, 1, 2])
    augmented = augmented_scores(scores, pairs, reference)
    for layer in range(4):
        for f in range(3):
            moved = reference.copy()
            moved[layer] = f
            # s̃_i(f) − s̃_i(ref) is the objective change of moving layer i alone to f.
            expected = objective_value(scores, pairs, moved) - objective_value(
                scores, pairs, reference
            )
            got = augmented[layer, f] - augmented[layer, reference[layer]]
            assert got == pytest.approx(expected, abs=1e-12)


def test_heatmap_writes_png_and_validates(tmp_path: Path) -> None:
    path = plot_interaction_heatmap(
        tmp_path / "plots" / "interactions.png",
        layer_names=["conv1", "conv2", "fc"],
        pairs=[(0, 1), (1, 2)],
        panels=[("largest", np.array([0.5, -1.0]), np.array([True, False]))],
        title="test",
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="pairs"):
        plot_interaction_heatmap(
            tmp_path / "x.png",
            layer_names=["a", "b"],
            pairs=[(1, 0)],
            panels=[("x", np.zeros(1), np.zeros(1, dtype=bool))],
            title="t",
        )
    with pytest.raises(ValueError, match="one entry per pair"):
        plot_interaction_heatmap(
            tmp_path / "x.png",
            layer_names=["a", "b"],
            pairs=[(0, 1)],
            panels=[("x", np.zeros(2), np.zeros(2, dtype=bool))],
            title="t",
        )


def test_pair_views_pick_the_largest_and_the_chosen_entries() -> None:
    terms = _terms()
    views = pair_views(terms, ["int4", "int2", "int8"], z=2.0)
    for k, (i, j) in enumerate(terms.pairs):
        block = terms.cross[(i, j)]
        assert abs(views["largest"][k]) == pytest.approx(np.abs(block).max())
    # Layer 0 holds int4 (index 1), layer 1 int2 (index 0); layer 2's int8 was not measured → 0.
    assert views["chosen"][terms.pairs.index((0, 1))] == terms.cross[(0, 1)][1, 0]
    assert views["chosen"][terms.pairs.index((0, 2))] == 0.0
    assert not views["chosen_significant"][terms.pairs.index((0, 2))]


# -- pipeline on a tiny model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory) -> dict[str, Path]:
    """An untrained DigitsNet checkpoint and 64 random 8x8 images with labels."""
    folder = tmp_path_factory.mktemp("digits")
    checkpoint, data = write_digits_files(folder)
    return {"checkpoint": checkpoint, "data": data, "dir": folder}


def _config(files: dict[str, Path], **analysis: object) -> RunConfig:
    return RunConfig(
        analysis=AnalysisConfig(
            model="demo-digits",
            checkpoint=str(files["checkpoint"]),
            calib=str(files["data"]),
            normalize="none",
            num_samples=32,
            batch_size=16,
            pair_samples=48,
            **analysis,  # type: ignore[arg-type]
        ),
        recovery=RecoveryConfig(num_samples=32),
    )


@pytest.fixture(scope="module")
def forward_run(digits_files) -> Path:
    run_dir = digits_files["dir"] / "run-forward"
    pipeline.analyze(_config(digits_files, pairwise="forward"), run_dir, progress=False)
    return run_dir


def test_analysis_stores_terms_that_reload_exactly(forward_run, digits_files) -> None:
    terms = load_interactions(forward_run / "interactions.npz")
    config = pipeline.read_config(forward_run)
    assert config.analysis.pairwise == "forward" and config.analysis.pair_loss == "kl"
    layers, _ = pipeline.read_layers(forward_run)
    assert terms.layer_names == tuple(layer.name for layer in layers)
    assert terms.format_names == ("int2", "int3", "int4")  # --pair-max-bits 4 of int2..int8
    assert terms.pairs == select_pairs(len(layers), "window", 3)
    assert terms.num_samples == 48
    # The same computation, directly on the same model and images, gives the stored numbers.
    model = load_model("demo-digits", str(digits_files["checkpoint"]))
    data = load_dataset(str(digits_files["data"]), normalization="none", num_classes=10)
    direct = compute_interactions(
        model,
        layers,
        data.inputs[:48],
        None,
        pair_formats(config.analysis.formats, 4),
        source="forward",
        pairs=terms.pairs,
        scheme=config.analysis.scheme,
        input_hessians=pipeline.read_input_hessians(forward_run, config),
    )
    for pair in terms.pairs:
        np.testing.assert_array_equal(terms.cross[pair], direct.cross[pair])
        np.testing.assert_array_equal(terms.stderr[pair], direct.stderr[pair])
    np.testing.assert_array_equal(terms.diagonal, direct.diagonal)
    layer_data = runfolder.read_json(forward_run / "layers.json", "layers")
    assert layer_data["interactions_seconds"] > 0


def _expected_objective(run_dir: Path, weight: float, z: float) -> tuple[np.ndarray, dict]:
    """Scores and pair terms rebuilt from the raw files, independently of `lcpaq.allocation.pairwise`."""
    table: CandidateTable = runfolder.load_candidates(run_dir / "candidates.npz")
    curvature = runfolder.load_curvature(run_dir / "curvature.npz")
    scores = score_candidates(table, curvature.clamped_trace(), "hawq_v2")
    with np.load(run_dir / "interactions.npz") as raw:
        measured = [str(name) for name in raw["format_names"]]
        pairs = {}
        for (i, j), block, error in zip(raw["pairs"], raw["cross"], raw["stderr"]):
            full = np.zeros((len(table.format_names),) * 2)
            for a, f in enumerate(table.format_names):
                for b, g in enumerate(table.format_names):
                    if f in measured and g in measured:
                        value = block[measured.index(f), measured.index(g)]
                        bar = error[measured.index(f), measured.index(g)]
                        full[a, b] = weight * value if abs(value) >= z * bar else 0.0
            pairs[(int(i), int(j))] = full
    return scores, pairs


def _brute_force(run_dir: Path, scores, pairs, bits: float) -> tuple[float, tuple[int, ...]]:
    table = runfolder.load_candidates(run_dir / "candidates.npz")
    params = table.num_params.astype(float)
    best = (np.inf, ())
    for choice in itertools.product(range(len(table.format_names)), repeat=len(params)):
        choice_array = np.array(choice)
        average = float((params * table.bits[choice_array]).sum() / params.sum())
        if average > bits + 1e-9:
            continue
        value = objective_value(scores, pairs, choice_array)
        if value < best[0]:
            best = (value, choice)
    return best


@pytest.mark.parametrize(("weight", "z"), [(1.0, 0.0), (0.5, 2.0), (200.0, 0.0)])
def test_allocation_with_pairs_equals_brute_force(forward_run, weight: float, z: float) -> None:
    scores, pairs = _expected_objective(forward_run, weight, z)
    allocation = pipeline.allocate(
        forward_run,
        [Budget("avg-bits", 3.0)],
        pairwise_weight=weight,
        pair_z=z,
        pairwise_mode="ilp",
    )
    value, choice = _brute_force(forward_run, scores, pairs, 3.0)
    assert allocation.predicted_loss_increase == pytest.approx(value, rel=1e-6, abs=1e-15)
    table = runfolder.load_candidates(forward_run / "candidates.npz")
    chosen = np.array([table.format_names.index(name) for name in allocation.formats])
    assert objective_value(scores, pairs, chosen) == pytest.approx(value, rel=1e-6, abs=1e-15)
    stored = json.loads((forward_run / "allocation.json").read_text())["pairwise"]
    assert stored["pairwise_weight"] == weight and stored["pair_z"] == z
    assert stored["pairs_used"] == len([p for p in pairs.values() if np.any(p != 0)])
    if weight == 200.0:  # with heavy pairs the optimum moves away from the diagonal-only one
        diagonal_value, diagonal_choice = _brute_force(forward_run, scores, {}, 3.0)
        assert diagonal_choice != choice
        diagonal = pipeline.allocate(forward_run, [Budget("avg-bits", 3.0)], pairwise_weight=0.0)
        assert diagonal.formats != allocation.formats
        assert diagonal.predicted_loss_increase == pytest.approx(diagonal_value, rel=1e-6)


def test_augmented_mode_never_worse_than_diagonal_under_the_full_objective(forward_run) -> None:
    scores, pairs = _expected_objective(forward_run, 200.0, 0.0)
    table = runfolder.load_candidates(forward_run / "candidates.npz")
    budget = [Budget("avg-bits", 3.0)]
    diagonal = pipeline.allocate(forward_run, budget, pairwise_weight=0.0)
    augmented = pipeline.allocate(
        forward_run, budget, pairwise_weight=200.0, pair_z=0.0, pairwise_mode="augmented"
    )
    assert augmented.average_bits <= 3.0 + 1e-9
    index = {name: k for k, name in enumerate(table.format_names)}
    value = objective_value(scores, pairs, np.array([index[f] for f in augmented.formats]))
    assert augmented.predicted_loss_increase == pytest.approx(value, rel=1e-9)
    diagonal_full = objective_value(scores, pairs, np.array([index[f] for f in diagonal.formats]))
    assert value <= diagonal_full + 1e-15
    exact, _ = _brute_force(forward_run, scores, pairs, 3.0)
    assert value >= exact - 1e-12 * abs(exact)  # a heuristic: never below the exact optimum
    # The sweep re-solves with the same options; every point is scored by the full objective.
    sweep = pipeline.sweep(forward_run, None, num_points=3, progress=False)
    points = [point for curve in sweep["curves"].values() for point in curve]
    assert points
    for point in points:
        choice = np.array([index[f] for f in point["formats"]])
        assert point["predicted_loss_increase"] == pytest.approx(
            objective_value(scores, pairs, choice), rel=1e-9
        )


def test_augmented_problem_on_a_toy_table() -> None:
    """The diagonal-only choice (a: int2, b: int4) carries a large pair penalty; the augmented solve
    moves away from it and returns the best visited assignment under the full objective."""
    table = CandidateTable(
        layer_names=("a", "b"),
        format_names=("int2", "int4"),
        bits=np.array([2, 4]),
        num_params=np.array([10, 10]),
        weight_bits=np.array([[20.0, 40.0], [20.0, 40.0]]),
        size_bits=np.array([[20.0, 40.0], [20.0, 40.0]]),
        error_sq=np.ones((2, 2)),
        weighted_error=np.full((2, 2), np.nan),
    )
    scores = np.array([[1.0, 0.5], [1.0, 0.4]])
    pairs = {(0, 1): np.array([[0.0, 5.0], [0.0, 0.0]])}  # a in int2 with b in int4 costs 5
    allowed = allowed_candidates(table, np.ones((2, 2), dtype=bool), {})

    def make(values: np.ndarray) -> AllocationProblem:
        return AllocationProblem(table, values, allowed)

    budget = [Budget("avg-bits", 3.0)]  # one layer may take int4
    assert make(scores).solve(budget).formats == ("int2", "int4")  # 1.4 without the pair
    problem = AugmentedProblem(make, scores, pairs)
    allocation = problem.solve(budget)
    assert allocation.formats == ("int4", "int2")  # 0.5 + 1.0 beats 1.4 + 5 and 2.0
    assert allocation.predicted_loss_increase == pytest.approx(1.5)
    assert problem.rounds_used >= 1
    assert problem.metric_value("avg-bits", np.array([1, 0])) == pytest.approx(3.0)
    exact = AllocationProblem(table, scores, allowed, pairwise=pairs).solve(budget)
    assert exact.formats == allocation.formats
    # Its Pareto curve solves the augmented problem at every budget, not the diagonal one.
    curve = problem.pareto_curve("avg-bits", 5)
    assert [point.formats for point in curve] == [
        ("int2", "int2"),
        ("int4", "int2"),
        ("int4", "int4"),
    ]
    for point in curve:
        again = problem.solve([Budget("avg-bits", point.budgets[0])])
        assert again.formats == point.formats
        assert point.predicted_loss_increase == pytest.approx(again.predicted_loss_increase)


def test_plot_and_report_show_the_terms(forward_run) -> None:
    pipeline.allocate(forward_run, [Budget("avg-bits", 3.0)])
    paths = pipeline.plot(forward_run)
    assert forward_run / "plots" / "interactions.png" in paths
    report = (pipeline.report(forward_run)).read_text()
    assert "## Inter-layer terms" in report and "measured on 48 samples" in report
    data = json.loads((forward_run / "report.json").read_text())
    assert data["interactions"]["num_pairs"] == len(
        load_interactions(forward_run / "interactions.npz").pairs
    )


def test_new_analysis_without_pairs_removes_stale_terms(digits_files) -> None:
    run_dir = digits_files["dir"] / "run-stale"
    pipeline.analyze(_config(digits_files, pairwise="gauss-newton"), run_dir, progress=False)
    assert load_interactions(run_dir / "interactions.npz").method == "gauss_newton"
    pipeline.analyze(_config(digits_files), run_dir, progress=False)
    assert not (run_dir / "interactions.npz").exists()
    pipeline.allocate(run_dir, [Budget("avg-bits", 3.0)])
    stored = json.loads((run_dir / "allocation.json").read_text())["pairwise"]
    assert stored["pairs_used"] == 0
    # The sweep reads the pairwise options back (and an allocation.json without them).
    assert pipeline.pair_options_of({}) == {
        "pairwise_weight": AllocationConfig().pairwise_weight,
        "pair_z": 2.0,
        "pair_clip": "none",
        "pairwise_mode": "augmented",
    }


# -- configuration and CLI ---------------------------------------------------------------------


def test_config_round_trip_and_old_files(digits_files) -> None:
    config = replace(
        _config(digits_files, pairwise="hessian", pair_rule="block", pair_window=2),
        allocation=AllocationConfig(pairwise_weight=0.25, pair_z=3.0, pair_clip="psd"),
    )
    data = json.loads(json.dumps(config.to_dict()))
    assert RunConfig.from_dict(data) == config
    for key in ("pairwise", "pair_rule", "pair_window", "pair_samples", "pair_loss"):
        del data["analysis"][key]
    for key in ("pairwise_weight", "pair_z", "pair_clip", "pairwise_mode"):
        del data["allocation"][key]
    old = RunConfig.from_dict(data)
    assert old.analysis.pairwise == "none" and old.analysis.pair_window == 3
    assert old.allocation.pair_z == 2.0 and old.allocation.pair_clip == "none"
    for bad in ({"pairwise": "magic"}, {"pair_window": 0}, {"pair_max_bits": 1}):
        with pytest.raises(InputError):
            _config(digits_files, **bad)
    for bad_allocation in ({"pairwise_weight": -1.0}, {"pair_z": float("nan")}, {"pair_clip": "x"}):
        with pytest.raises(InputError):
            AllocationConfig(**bad_allocation)  # type: ignore[arg-type]


def _analyze_args(files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return digits_command(
        "analyze",
        files["checkpoint"],
        files["data"],
        *("--num-samples", "32", "--batch-size", "16", "--out", str(out)),
        *extra,
    )


def test_cli_flags_reach_the_run_folder(digits_files, capsys) -> None:
    out = digits_files["dir"] / "cli-run"
    flags = (
        "--pairwise",
        "gauss-newton",
        "--pair-window",
        "1",
        "--pair-samples",
        "40",
        "--pair-max-bits",
        "3",
    )
    assert main(_analyze_args(digits_files, out, *flags)) == 0
    analysis = json.loads((out / "run_config.json").read_text())["analysis"]
    assert analysis["pairwise"] == "gauss-newton" and analysis["pair_window"] == 1
    assert analysis["pair_samples"] == 40 and analysis["pair_max_bits"] == 3
    terms = load_interactions(out / "interactions.npz")
    assert terms.pairs == ((0, 1), (1, 2), (2, 3), (3, 4))
    assert terms.format_names == ("int2", "int3") and terms.num_samples == 40
    allocate = [
        "-q",
        "allocate",
        str(out),
        "--budget",
        "avg-bits=3",
        "--pairwise-weight",
        "0.5",
        "--pair-z",
        "0",
        "--pair-clip",
        "negative",
        "--pairwise-mode",
        "ilp",
    ]
    assert main(allocate) == 0
    stored = json.loads((out / "allocation.json").read_text())["pairwise"]
    assert stored["pairwise_weight"] == 0.5 and stored["pair_z"] == 0.0
    assert stored["pair_clip"] == "negative" and stored["pairwise_mode"] == "ilp"
    # A run from the stored configuration measures the same terms.
    rerun = digits_files["dir"] / "cli-rerun"
    config_args = ["-q", "run", "--config", str(out / "run_config.json"), "--budget"]
    assert main([*config_args, "avg-bits=3", "--sweep-points", "0", "--out", str(rerun)]) == 0
    again = load_interactions(rerun / "interactions.npz")
    for pair in terms.pairs:
        np.testing.assert_array_equal(again.cross[pair], terms.cross[pair])
    capsys.readouterr()
    # Bad values: one line, exit 2.
    assert main([*allocate[:5], "--pairwise-weight", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pairwise-weight" in err[0]
    assert (
        main(_analyze_args(digits_files, out, "--pairwise", "forward", "--pair-max-bits", "1")) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pair-max-bits" in err[0]
