"""LIMPQ's learned step sizes (`lcpaq.sensitivity.limpq`): LSQ's gradient, the objective they
lower, the indicator they give, its file, and the scorer through analyze and the ILP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import conv_inputs, make_tiny_conv_net, write_digits_files
from torch import nn

from lcpaq import runfolder
from lcpaq.allocation.budgets import parse_budget
from lcpaq.config import AnalysisConfig, RecoveryConfig, RunConfig
from lcpaq.errors import InputError
from lcpaq.model.graph import discover_layers
from lcpaq.sensitivity.limpq import (
    NON_MONOTONE_PENALTY,
    LearnedStepSizes,
    code_bounds,
    indicator_columns,
    learn_step_sizes,
    load_step_sizes,
    lsq_quantize,
    save_step_sizes,
)
from lcpaq.stages import pipeline
from lcpaq.stages.folder import load_model_and_data

pytestmark = pytest.mark.usefixtures("single_thread")


def test_code_bounds_are_lsq_signed_grid() -> None:
    assert code_bounds("int2") == (-2, 1)
    assert code_bounds("int8") == (-128, 127)
    assert code_bounds("int2", symmetric=True) == (-1, 1)
    with pytest.raises(InputError, match="fp8_e4m3"):
        code_bounds("fp8_e4m3")


def test_lsq_gradient_is_the_straight_through_one() -> None:
    """d ŵ/d s = round(w/s) − w/s inside the grid, the bound outside it (LSQ)."""
    weight = torch.tensor([[0.26, -0.61, 1.7], [0.05, -0.9, 0.33]], dtype=torch.float64)
    step = torch.tensor([0.2, 0.3], dtype=torch.float64, requires_grad=True)
    low, high = code_bounds("int3")  # [-4, 3]
    quantized = lsq_quantize(weight, step, low, high)
    scaled = weight / step.detach()[:, None]
    rounded = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)
    np.testing.assert_allclose(
        quantized.detach(), torch.clamp(rounded, low, high) * step.detach()[:, None]
    )
    grads = [torch.autograd.grad(quantized[i, j], step, retain_graph=True)[0] for i, j in
             [(0, 0), (0, 2), (1, 1)]]  # fmt: skip
    assert grads[0][0].item() == pytest.approx(1 - 1.3)  # round(1.3) − 1.3
    assert grads[1][0].item() == pytest.approx(high)  # 1.7 / 0.2 = 8.5 > 3: clipped
    assert grads[2][1].item() == pytest.approx(-3 + 3.0)  # −0.9 / 0.3 = −3: on the grid
    assert grads[0][1].item() == 0.0  # other channel


def test_learning_lowers_the_objective_of_every_format() -> None:
    model = make_tiny_conv_net()
    inputs = conv_inputs(32)
    layers = discover_layers(model, inputs)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    learned = learn_step_sizes(
        model, layers, inputs, ["int2", "int3", "int4"], steps=20, batch_size=16
    )
    assert (learned.objective_after < learned.objective_before).all()
    assert learned.passes == 20 * 4
    assert [steps.shape for steps in learned.step_sizes] == [
        (3, layer.weight_shape[0]) for layer in layers
    ]
    for key, value in model.state_dict().items():  # the model is left as it was
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


class _Branches(nn.Module):
    """Two linear branches summed; ``small`` holds ``big``'s weights × 0.1, so ``big`` carries
    ten times more of the output."""

    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(12, 5, bias=False)
        self.small = nn.Linear(12, 5, bias=False)
        with torch.no_grad():
            self.small.weight.copy_(0.1 * self.big.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.big(x) + self.small(x)


def test_indicator_ranks_the_layer_that_carries_the_output_first(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Branches().eval()
    inputs = torch.randn(64, 12, generator=torch.Generator().manual_seed(1))
    layers = discover_layers(model, inputs)
    learned = learn_step_sizes(model, layers, inputs, ["int2", "int4"], steps=30, batch_size=32)
    indicator = learned.indicator()
    names = [layer.name for layer in layers]
    big, small = names.index("big"), names.index("small")
    assert (indicator[big] > indicator[small]).all()
    assert (indicator[:, 0] > indicator[:, 1]).all()  # fewer bits, larger step
    # What the ILP minimises: moving `big` from 2 to 4 bits saves more than moving `small`.
    assert indicator[big, 0] - indicator[big, 1] > indicator[small, 0] - indicator[small, 1]
    again = learn_step_sizes(model, layers, inputs, ["int2", "int4"], steps=30, batch_size=32)
    np.testing.assert_array_equal(again.indicator(), indicator)  # deterministic for one seed
    save_step_sizes(tmp_path / "step_sizes.npz", learned)
    loaded = load_step_sizes(tmp_path / "step_sizes.npz")
    np.testing.assert_array_equal(loaded.indicator(), indicator)
    assert loaded.passes == learned.passes and loaded.format_names == learned.format_names


def _learned(indicator: np.ndarray, formats: tuple[str, ...]) -> LearnedStepSizes:
    return LearnedStepSizes(
        layer_names=("a", "b"),
        format_names=formats,
        step_sizes=tuple(row[:, None].astype(np.float32) for row in indicator),
        objective_before=np.zeros(len(formats)),
        objective_after=np.zeros(len(formats)),
        steps=1,
        batch_size=1,
        passes=1,
        forward_passes=1,
        seconds=0.0,
    )


def test_indicator_columns_forbid_non_monotone_steps_and_skip_non_int() -> None:
    learned = _learned(np.array([[0.5, 0.25, 0.1], [0.2, 0.3, 0.1]]), ("int2", "int3", "int4"))
    columns = indicator_columns(learned, ("a", "b"), ("int2", "int4", "fp8_e4m3", "int2"))
    penalty = NON_MONOTONE_PENALTY * 0.5
    np.testing.assert_allclose(columns[0], [0.5, 0.1, np.nan, 0.5])
    np.testing.assert_allclose(columns[1], [penalty, 0.1, np.nan, penalty], rtol=1e-6)
    with pytest.raises(InputError, match="other layers"):
        indicator_columns(learned, ("b", "a"), ("int2",))


def test_limpq_scorer_through_analyze_and_the_ilp(tmp_path: Path) -> None:
    checkpoint, data = write_digits_files(tmp_path, num_images=32)
    config = RunConfig(
        analysis=AnalysisConfig(
            model="demo-digits",
            checkpoint=str(checkpoint),
            calib=str(data),
            normalize="none",
            num_samples=16,
            batch_size=16,
            formats=("int2", "int4", "int8"),
            limpq_steps=3,
        ),
        recovery=RecoveryConfig(num_samples=16, learn_scales=True),
    )
    run_dir = tmp_path / "run"
    pipeline.analyze(config, run_dir, progress=False)
    learned = load_step_sizes(run_dir / "step_sizes.npz")
    assert learned.passes == 3 * 4
    table = runfolder.load_candidates(run_dir / "candidates.npz")
    expected = indicator_columns(learned, table.layer_names, table.weight_formats)
    np.testing.assert_array_equal(table.learned_step, expected)
    allocation = pipeline.allocate(run_dir, [parse_budget("avg-bits=4")], scorer="limpq")
    assert allocation.average_bits <= 4 + 1e-9
    scores = expected[np.arange(len(table.layer_names)), table.columns_of(allocation.formats)]
    assert allocation.predicted_loss_increase == pytest.approx(scores.sum())
    # --learn-scales: export quantizes every layer at its learned steps for its format.
    model, calib = load_model_and_data(config, 16)
    layers, _ = pipeline.read_layers(run_dir)
    assignment = pipeline.weight_assignment(allocation.layer_names, allocation.formats)
    _, codes = pipeline.quantize_and_recover(
        model,
        layers,
        assignment,
        config,
        calib.inputs,
        input_hessians=pipeline.read_input_hessians(run_dir, config),
        learned_steps=learned,
    )
    for row, name in enumerate(learned.layer_names):
        steps = learned.step_sizes[row][learned.format_names.index(assignment[name])]
        np.testing.assert_array_equal(codes[name].scale.numpy(), steps)
    pipeline.export(run_dir)
    manifest = json.loads((run_dir / "quantized" / "manifest.json").read_text())
    assert manifest["recovery"]["learned_scales"] is True
    # Without learned steps the scorer and --learn-scales say what to run.
    pipeline.analyze(config.with_analysis(limpq_steps=0), run_dir, progress=False)
    assert not (run_dir / "step_sizes.npz").exists()
    with pytest.raises(InputError, match="--limpq-steps"):
        pipeline.allocate(run_dir, [parse_budget("avg-bits=4")], scorer="limpq")
    pipeline.allocate(run_dir, [parse_budget("avg-bits=4")])
    with pytest.raises(InputError, match="limpq-steps"):
        pipeline.export(run_dir)
