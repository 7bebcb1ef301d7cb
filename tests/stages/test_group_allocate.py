"""Allocation per output-channel group (`lcpaq.stages.group_allocate`) on an analysed digits run:
groups as wide as every layer give the per-layer allocation, narrower groups meet the same budget
with a predicted loss no larger, and the mixed checkpoint loads back exactly; the bar plot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_png, digits_command, write_digits_files

from lcpaq.allocation.budgets import parse_budget
from lcpaq.cli import main
from lcpaq.model.zoo import load_model
from lcpaq.quant.checkpoint import load_quantized, quantize_model_groups, write_quantized_checkpoint
from lcpaq.stages import pipeline
from lcpaq.stages.group_allocate import allocate_groups
from lcpaq.stages.group_figures import plot_channel_formats

pytestmark = pytest.mark.usefixtures("single_thread")

FORMATS = "pruned,binary,ternary,int2,int4,int8"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("groups")
    checkpoint, data = write_digits_files(folder, 64)
    out = folder / "run"
    flags = ("--formats", FORMATS, "--num-samples", "32", "--out", str(out))
    assert main(digits_command("analyze", checkpoint, data, *flags)) == 0
    assert (out / "channel_errors.npz").is_file()
    return out


def test_groups_as_wide_as_layers_are_the_per_layer_allocation(run_dir: Path) -> None:
    budget = parse_budget("avg-bits=1.5")
    per_layer = pipeline.allocate(run_dir, [budget], scorer="output")
    wide = allocate_groups(run_dir, [budget], 10_000, scorer="output")
    assert wide.allocation.formats == per_layer.formats
    assert wide.allocation.predicted_loss_increase == pytest.approx(
        per_layer.predicted_loss_increase, rel=1e-9
    )
    narrow = allocate_groups(run_dir, [budget], 1, scorer="output")
    assert narrow.allocation.average_bits <= 1.5 + 1e-9
    # Every per-layer choice is a per-channel choice: the optimum can only improve.
    assert narrow.allocation.predicted_loss_increase <= per_layer.predicted_loss_increase + 1e-15
    assert len(narrow.allocation.layer_names) == sum(
        sum(counts.values()) for counts in narrow.channel_counts.values()
    )


def test_mixed_allocation_exports_and_loads_exactly(run_dir: Path, tmp_path: Path) -> None:
    result = allocate_groups(run_dir, [parse_budget("avg-bits=2")], 4, scorer="output")
    config = pipeline.read_config(run_dir)
    model = load_model(config.analysis.model, config.analysis.checkpoint)
    layers = list(pipeline.read_layers(run_dir)[0])
    hessians = pipeline.read_input_hessians(run_dir, config)
    quantized, codes = quantize_model_groups(
        model, layers, result.groups, config.analysis.scheme, hessians
    )
    extra = {"budget": "avg-bits=2", "source_sha256": "0" * 64}
    path = write_quantized_checkpoint(
        tmp_path / "ckpt", quantized.state_dict(), layers, codes, extra, config.analysis.scheme
    )
    loaded = load_quantized(path)
    for key, tensor in quantized.state_dict().items():
        assert torch.equal(loaded[key], tensor), key
    figure = plot_channel_formats(
        tmp_path / "channels.png",
        counts=result.channel_counts,
        format_names=FORMATS.split(","),
        title="digits, 2 bits, a format per 4 channels",
    )
    assert_png(figure, tmp_path)
