"""The Python API over objects in memory (docs/api.md): `lcpaq.quantize` on the tiny digits
model from tensors, a DataLoader and a torch Dataset, ``out=`` writing the run folder, and the
steps one by one giving the same result."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import lcpaq
from lcpaq.errors import InputError
from lcpaq.model.demo import DigitsNet

OPTIONS = {"formats": ("int2", "int4", "int8"), "num_samples": 32, "batch_size": 16}


@pytest.fixture(scope="module")
def model_and_data() -> tuple[DigitsNet, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = DigitsNet().eval()
    generator = torch.Generator().manual_seed(1)
    inputs = torch.rand(48, 1, 8, 8, generator=generator)
    labels = torch.randint(0, 10, (48,), generator=generator)
    return model, inputs, labels


def test_importing_lcpaq_does_not_import_torch() -> None:
    code = "import sys, lcpaq; lcpaq.quantize; print('torch' in sys.modules)"
    lazy = "import sys, lcpaq; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", lazy], capture_output=True, text=True).stdout == (
        "False\n"
    )
    # The API itself loads on first use.
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout == (
        "True\n"
    )


def test_quantize_meets_the_budget_and_writes_the_run_folder(model_and_data, tmp_path) -> None:
    model, inputs, labels = model_and_data
    result = lcpaq.quantize(model, (inputs, labels), "avg-bits=4", out=tmp_path / "run", **OPTIONS)
    assert result.average_bits <= 4 + 1e-9
    assert list(result.formats) == [layer.name for layer in result.analysis.layers]
    assert set(result.formats.values()) <= {"int2", "int4", "int8"}
    assert result.budget_table[0]["metric"] == "avg-bits"
    assert result.budget_table[0]["used"] == pytest.approx(result.average_bits)
    # The model is quantized: every weight of a layer at b bits takes at most 2^b values.
    for layer in result.analysis.layers:
        weight = result.model.get_submodule(layer.name).weight
        bits = int(result.formats[layer.name].removeprefix("int"))
        assert max(len(torch.unique(row)) for row in weight.flatten(1)) <= 2**bits
    run = tmp_path / "run"
    allocation = json.loads((run / "allocation.json").read_text())
    assert allocation["formats"] == list(result.allocation.formats)
    assert "budget: avg-bits=4;" in (run / "report.md").read_text()
    loaded = lcpaq.load_quantized(run / "quantized", DigitsNet())
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), result.model(inputs))


def test_steps_one_by_one_and_other_data_forms(model_and_data) -> None:
    model, inputs, labels = model_and_data
    whole = lcpaq.quantize(model, (inputs, labels), "avg-bits=3", **OPTIONS)
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=10)
    analysis = lcpaq.analyze(model, loader, **OPTIONS)
    allocation = lcpaq.allocate(analysis, "avg-bits=3")
    assert allocation.formats == whole.allocation.formats
    assert allocation.predicted_loss_increase == whole.predicted_loss_increase
    quantized = lcpaq.export(model, analysis, allocation, TensorDataset(inputs, labels))
    with torch.no_grad():
        torch.testing.assert_close(quantized.model(inputs), whole.model(inputs))
    evaluation = lcpaq.evaluate(model, quantized.model, (inputs, labels))
    assert evaluation["fp32"]["num_samples"] == 48


def test_bad_calibration_data_and_options_are_named(model_and_data) -> None:
    model, inputs, labels = model_and_data
    with pytest.raises(InputError, match="as many labels"):
        lcpaq.quantize(model, (inputs, labels[:3]), **OPTIONS)
    with pytest.raises(InputError, match="calibration data must be"):
        lcpaq.quantize(model, 42, **OPTIONS)
    with pytest.raises(InputError, match="unknown option 'bits'"):
        lcpaq.quantize(model, (inputs, labels), bits=3)
