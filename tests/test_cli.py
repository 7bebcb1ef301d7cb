"""CLI: smoke runs of `demo` and of `run` on the shared ResNet20, and every bad input of the
foundation issue: one clear line on stderr, exit status != 0, nothing half-written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ALLOCATED_RUN_FILES, digits_command, write_digits_files
from safetensors.torch import save_file

from lcpaq import load_quantized, runfolder
from lcpaq.cli import main
from lcpaq.config import RunConfig
from lcpaq.model.demo import DigitsNet
from lcpaq.quant.checkpoint import read_checkpoint, read_manifest

SHARED = Path(os.environ.get("LCPAQ_SHARED", Path(__file__).resolve().parents[2] / "shared"))
RESNET20 = SHARED / "checkpoints" / "resnet20-12fca82f.th"


@pytest.fixture()
def digits_files(tmp_path: Path) -> dict[str, Path]:
    """An (untrained) DigitsNet checkpoint and small valid data files: enough to exercise errors."""
    checkpoint, data = write_digits_files(tmp_path)
    return {"checkpoint": checkpoint, "data": data, "dir": tmp_path}


def _run(
    files: dict[str, Path], out: Path, *extra: str, checkpoint: Path | None = None
) -> list[str]:
    return digits_command(
        "run",
        checkpoint or files["checkpoint"],
        files["data"],
        "--num-samples",
        "32",
        "--correction-samples",
        "32",
        "--sweep-points",
        "0",
        "--budget",
        "avg-bits=4",
        "--out",
        str(out),
        *extra,
    )


def _assert_clean_error(capsys, code: int, *needles: str) -> str:
    captured = capsys.readouterr()
    assert code == 2
    lines = [line for line in captured.err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("lcpaq: error: ")
    assert "Traceback" not in captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_run_on_small_model_writes_every_artifact(digits_files, tmp_path):
    out = tmp_path / "run"
    assert main(_run(digits_files, out, "--eval", str(digits_files["data"]))) == 0
    for name in (
        *ALLOCATED_RUN_FILES,
        "quantized/model.safetensors",
        "quantized/manifest.json",
        "evaluation.json",
        "report.md",
        "report.json",
        "plots/frontiers.png",
        "plots/bit_allocation.png",
    ):
        assert (out / name).is_file(), name
    allocation = json.loads((out / "allocation.json").read_text())
    assert allocation["average_bits"] <= 4 + 1e-9
    report = json.loads((out / "report.json").read_text())
    assert len(report["layers"]) == 5
    assert all(row["format"] for row in report["layers"])
    assert json.loads((out / "evaluation.json").read_text())["quantized_inputs"] == {}
    assert (
        "(exported checkpoint, weights only, activations FP32)" in (out / "report.md").read_text()
    )


def test_stages_rerun_on_the_same_folder(digits_files, tmp_path):
    out = tmp_path / "run"
    assert main(_run(digits_files, out)) == 0
    curvature_before = (out / "curvature.npz").read_bytes()
    assert (
        main(["-q", "allocate", str(out), "--budget", "avg-bits=2.5", "--first-last", "keep-8bit"])
        == 0
    )
    allocation = json.loads((out / "allocation.json").read_text())
    assert allocation["average_bits"] <= 2.5 + 1e-9
    assert allocation["assignment"]["conv1"] == "int8" and allocation["assignment"]["fc2"] == "int8"
    assert main(["-q", "allocate", str(out), "--budget", "size-mb=0.03"]) == 0
    size = json.loads((out / "allocation.json").read_text())["size_bytes"]
    assert size <= 0.03e6
    assert main(["-q", "export", str(out)]) == 0
    assert main(["-q", "evaluate", str(out), "--eval", str(digits_files["data"])]) == 0
    assert main(["-q", "sweep", str(out), "--sweep-points", "3"]) == 0
    assert main(["-q", "plot", str(out)]) == 0
    assert main(["-q", "report", str(out)]) == 0
    assert (out / "plots" / "model_curve.png").is_file()
    assert (
        out / "curvature.npz"
    ).read_bytes() == curvature_before  # the Hessian was not recomputed
    manifest = json.loads((out / "quantized" / "manifest.json").read_text())
    assert manifest["totals"]["size_bytes"] == pytest.approx(size)


@pytest.mark.parametrize(
    ("budget", "needle"),
    [
        ("avg-bits=-1", "positive"),
        ("bits=3", "unknown metric"),
        ("avg-bits=abc", "not a number"),
        ("avg-bits=1.5", "avg-bits ranges from"),
        ("size-mb=0.0001", "size-mb ranges from"),
    ],
)
def test_bad_budget(digits_files, tmp_path, capsys, budget, needle):
    out = tmp_path / "run"
    args = _run(digits_files, out)
    args[args.index("avg-bits=4")] = budget
    _assert_clean_error(capsys, main(args), needle)
    assert not (out / "allocation.json").exists()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--pyhessian-iters", "1"], "pyhessian-iters must be 0 (off) or at least 2"),
        (["--pyhessian-iters", "8", "--loss", "mse"], "cannot check loss 'mse'"),
    ],
)
def test_bad_pyhessian_options(digits_files, tmp_path, capsys, extra, needle):
    out = tmp_path / "run"
    _assert_clean_error(capsys, main([*_run(digits_files, out), *extra]), needle)
    assert not (out / "layers.json").exists()


@pytest.mark.parametrize("damp", ["0", "-0.5", "2"])
def test_bad_gptq_damp(digits_files, tmp_path, capsys, damp):
    out = tmp_path / "run"
    args = [*_run(digits_files, out), "--rounding", "gptq", "--gptq-damp", damp]
    _assert_clean_error(capsys, main(args), "gptq damping must be in (0, 1]", damp)
    assert not (out / "layers.json").exists()


def test_missing_checkpoint(digits_files, tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    _assert_clean_error(
        capsys,
        main(_run(digits_files, tmp_path / "r", checkpoint=missing)),
        str(missing),
        "does not exist",
    )


def test_truncated_checkpoint(digits_files, tmp_path, capsys):
    path = tmp_path / "model.pt"
    torch.save(DigitsNet().state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _assert_clean_error(
        capsys, main(_run(digits_files, tmp_path / "r", checkpoint=path)), str(path)
    )


def test_truncated_safetensors(digits_files, tmp_path, capsys):
    path = tmp_path / "model.safetensors"
    path.write_bytes(digits_files["checkpoint"].read_bytes()[:100])
    _assert_clean_error(
        capsys, main(_run(digits_files, tmp_path / "r", checkpoint=path)), str(path)
    )


def test_state_dict_that_does_not_fit(digits_files, tmp_path, capsys):
    state = DigitsNet().state_dict()
    del state["conv2.weight"]
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    _assert_clean_error(
        capsys,
        main(_run(digits_files, tmp_path / "r", checkpoint=path)),
        "'conv2.weight'",
        "missing",
    )


class _Payload:
    """A class a weights-only load cannot rebuild: stands for arbitrary pickled code."""

    def __reduce__(self):
        return (print, ("this would run on load",))


def test_checkpoint_needing_unpickling_is_refused(digits_files, tmp_path, capsys):
    path = tmp_path / "pickled.pt"
    torch.save(
        {"state_dict": DigitsNet().state_dict(), "extra": _Payload()},
        path,
    )
    line = _assert_clean_error(
        capsys, main(_run(digits_files, tmp_path / "r", checkpoint=path)), str(path)
    )
    assert "--allow-unsafe-pickle" in line
    assert main(_run(digits_files, tmp_path / "r2", "--allow-unsafe-pickle", checkpoint=path)) == 0


def test_nan_weights(digits_files, tmp_path, capsys):
    state = DigitsNet().state_dict()
    state["conv3.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(state, path)
    _assert_clean_error(
        capsys, main(_run(digits_files, tmp_path / "r", checkpoint=path)), "'conv3.weight'", "NaN"
    )


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"x": np.zeros((0, 1, 8, 8), np.uint8), "y": np.zeros(0, np.int64)}, "empty"),
        ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.zeros(4, np.int64)}, "NCHW"),
        ({"x": np.full((4, 1, 8, 8), -3, np.int32), "y": np.zeros(4, np.int64)}, "0..255"),
        ({"x": np.zeros((4, 1, 8, 8), np.uint8), "y": np.array([0, 1, 2, 10])}, "out of range"),
        ({"x": np.zeros((4, 1, 8, 8), np.uint8), "y": np.array([0, 1, -1, 2])}, "negative"),
        ({"x": np.zeros((4, 1, 8, 8), np.uint8)}, "'y'"),
    ],
)
def test_bad_calibration_file(digits_files, tmp_path, capsys, arrays, needle):
    data = tmp_path / "bad.npz"
    np.savez(data, **arrays)
    args = _run(digits_files, tmp_path / "r")
    args[args.index(str(digits_files["data"]))] = str(data)
    _assert_clean_error(capsys, main(args), str(data), needle)


def test_missing_calibration_file(digits_files, tmp_path, capsys):
    args = _run(digits_files, tmp_path / "r")
    args[args.index(str(digits_files["data"]))] = str(tmp_path / "missing.npz")
    _assert_clean_error(capsys, main(args), "missing.npz", "does not exist")


def test_output_folder_not_writable(digits_files, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    _assert_clean_error(
        capsys, main(_run(digits_files, blocker / "run")), str(blocker / "run"), "not writable"
    )


def test_failed_reexport_keeps_the_previous_checkpoint(digits_files, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert main(_run(digits_files, out)) == 0
    before = (out / "quantized" / "model.safetensors").read_bytes()

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("lcpaq.quant.checkpoint.save_file", interrupted)
    assert main(["-q", "allocate", str(out), "--budget", "avg-bits=2"]) == 0
    assert main(["-q", "export", str(out)]) == 130
    assert (out / "quantized" / "model.safetensors").read_bytes() == before
    assert sorted(path.name for path in out.iterdir() if path.name.startswith(".")) == []


def test_demo_runs_offline(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--out", str(out), "--sweep-points", "3"]) == 0
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["fp32"]["top1"] > 0.95  # a really trained network
    assert evaluation["quantized"]["top1"] > 0.9
    report = json.loads((out / "report.json").read_text())
    traces = [row["trace"] for row in report["layers"]]
    assert max(traces) / min(traces) > 3  # layers really differ in sensitivity
    assert report["curvature"]["hutchinson"]["spearman_vs_gauss_newton"] > 0.8
    # The PyHessian cross-check: its whole-weight trace matches the sum of the layers' traces.
    check = report["curvature"]["pyhessian"]
    assert abs(check["difference_in_pyhessian_stderr"]) < 4 and check["top_eigenvalues"][0] > 0
    assert "PyHessian check" in (out / "report.md").read_text()
    for name in ("frontiers.png", "model_curve.png", "bit_allocation.png"):
        assert (out / "plots" / name).stat().st_size > 10_000


@pytest.mark.skipif(
    not RESNET20.is_file(),
    reason=f"shared ResNet20 checkpoint not found at {RESNET20} (set LCPAQ_SHARED)",
)
def test_run_on_shared_resnet20(tmp_path):
    out = tmp_path / "r20"
    args = [
        "-q",
        "run",
        "--model",
        "cifar-resnet",
        "--checkpoint",
        str(RESNET20),
        "--calib",
        str(SHARED / "data" / "cifar10_train_subset.npz"),
        "--eval",
        str(SHARED / "data" / "cifar10_test.npz"),
        "--budget",
        "avg-bits=3",
        "--num-samples",
        "64",
        "--correction-samples",
        "512",
        "--sweep-points",
        "0",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["fp32"]["top1"] == pytest.approx(0.9164, abs=1e-3)
    # Shared README: uniform INT3 gives 72.96 %, the HAWQ-V2 reference ILP 76.70 %.
    assert evaluation["quantized"]["top1"] > 0.85
    manifest = json.loads((out / "quantized" / "manifest.json").read_text())
    assert len(manifest["layers"]) == 20
    assert manifest["source_sha256"].startswith("12fca82f")
    # Packed codes: the file is the size the budget counts, plus safetensors' header.
    assert (
        manifest["totals"]["size_bytes"]
        < manifest["file_bytes"]
        < 1.05 * manifest["totals"]["size_bytes"] + 20_000
    )
    state = load_quantized(out / "quantized")
    for entry in manifest["layers"]:
        weight = state[entry["weight_key"]]
        distinct = max(len(torch.unique(row)) for row in weight.reshape(weight.shape[0], -1))
        assert distinct <= 2 ** entry["bits"]


def test_torchvision_model_with_many_classes(tmp_path):
    """torchvision:<name> with weights from --checkpoint; 1000 classes use the sampled Fisher."""
    import torchvision

    torch.manual_seed(0)
    checkpoint = tmp_path / "mobilenet.pt"
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), checkpoint)
    data = tmp_path / "images.pt"
    torch.save(
        {"x": torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8), "y": torch.arange(8)}, data
    )
    out = tmp_path / "run"
    args = [
        "-q",
        "analyze",
        "--model",
        "torchvision:mobilenet_v3_small",
        "--checkpoint",
        str(checkpoint),
    ]
    args += ["--calib", str(data), "--num-samples", "8", "--batch-size", "4", "--out", str(out)]
    args += ["--formats", "int4,int8"]
    assert main(args) == 0
    assert main(["-q", "allocate", str(out), "--budget", "avg-bits=4"]) == 0
    report = json.loads((out / "layers.json").read_text())
    # 52 convolutions (depthwise ones included, squeeze-excitation 1x1s with bias) + 2 Linear.
    assert len(report["layers"]) == 54
    from lcpaq.runfolder import load_curvature

    assert load_curvature(out / "curvature.npz").method == "fisher_sampled"


def test_user_factory_model(digits_files, tmp_path):
    """package.module:factory builds the user's own nn.Module."""
    args = _run(digits_files, tmp_path / "run")
    args[args.index("demo-digits")] = "lcpaq.model.demo:DigitsNet"
    assert main(args) == 0
    manifest = json.loads((tmp_path / "run" / "quantized" / "manifest.json").read_text())
    assert manifest["model"] == "lcpaq.model.demo:DigitsNet"


def test_run_config_file_reproduces_a_run(digits_files, tmp_path):
    """`lcpaq run --config` (how a searched configuration is reused) repeats a run exactly."""
    first = tmp_path / "first"
    assert main(_run(digits_files, first, "--clipping", "minmax", "--first-last", "keep-8bit")) == 0
    config = json.loads((first / "run_config.json").read_text())
    assert config["allocation"]["budgets"] == ["avg-bits=4"]
    assert config["allocation"]["first_last"] == "keep-8bit"
    second = tmp_path / "second"
    argv = ["-q", "run", "--config", str(first / "run_config.json"), "--sweep-points", "0"]
    assert main([*argv, "--out", str(second)]) == 0
    assert json.loads((second / "run_config.json").read_text()) == config
    chosen = [
        json.loads((run / "allocation.json").read_text())["formats"] for run in (first, second)
    ]
    assert chosen[0] == chosen[1]
    # --budget overrides the file's budgets; analysis options may not be mixed with --config.
    third = tmp_path / "third"
    assert main([*argv, "--budget", "avg-bits=8", "--out", str(third)]) == 0
    assert json.loads((third / "allocation.json").read_text())["average_bits"] > 4


def test_run_config_conflicts_and_bad_files(digits_files, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 1, "analysis": {"model": "demo-digits"}}')
    code = main(["-q", "run", "--config", str(bad), "--out", str(tmp_path / "o")])
    _assert_clean_error(capsys, code, "bad.json", "malformed")
    code = main(
        ["-q", "run", "--config", str(bad), "--num-samples", "8", "--out", str(tmp_path / "o")]
    )
    _assert_clean_error(capsys, code, "--num-samples", "--config")
    code = main(["-q", "run", "--budget", "avg-bits=3", "--out", str(tmp_path / "o")])
    _assert_clean_error(capsys, code, "--model")


@pytest.mark.usefixtures("single_thread")
def test_min_max_activation_ranges_and_old_configurations(digits_files, tmp_path):
    """``--act-clipping minmax`` quantizes every layer's input with its observed range; the
    exported model reproduces the in-memory W+A model; configurations from before the option
    load as min-max, which is what they did."""
    from lcpaq.config import RunConfig
    from lcpaq.errors import InputError
    from lcpaq.model.zoo import build_model
    from lcpaq.sensitivity.activation_file import load_activation_sensitivity
    from lcpaq.stages import folder, pipeline

    out = tmp_path / "run"
    args = ["-q", "run", "--model", "demo-digits", "--checkpoint", str(digits_files["checkpoint"])]
    args += ["--calib", str(digits_files["data"]), "--normalize", "none", "--num-samples", "16"]
    args += ["--correction-samples", "16", "--formats", "int2,int4,int8", "--act-formats", "int4"]
    args += ["--act-clipping", "minmax", "--budget", "avg-bits=4", "--sweep-points", "0"]
    assert main([*args, "--out", str(out)]) == 0
    config = pipeline.read_config(out)
    assert config.analysis.act_clipping == "minmax"
    sensitivity = load_activation_sensitivity(out / "activations.npz")
    manifest = json.loads((out / "quantized" / "manifest.json").read_text())
    for entry in manifest["layers"]:
        row = sensitivity.layer_names.index(entry["name"])
        quantizer = entry["activation_quantizer"]
        assert (quantizer["low"], quantizer["high"]) == (
            sensitivity.low[row],
            sensitivity.high[row],
        )
    layers, _ = pipeline.read_layers(out)
    allocation, _ = pipeline.read_allocation(out)
    model, calib = folder.load_model_and_data(config, 16)
    in_memory, _ = pipeline.quantize_and_recover(
        model,
        layers,
        pipeline.weight_assignment(allocation.layer_names, allocation.formats),
        config,
        calib.inputs,
        input_hessians=pipeline.read_input_hessians(out, config),
        activation_quantizers=pipeline.activation_quantizers_of(
            out, allocation.layer_names, allocation.formats
        ),
    )
    loaded = load_quantized(out / "quantized", build_model("demo-digits", model.state_dict()))
    with torch.no_grad():
        torch.testing.assert_close(loaded(calib.inputs), in_memory(calib.inputs))
    data = config.to_dict()
    del data["analysis"]["act_clipping"]
    assert RunConfig.from_dict(data).analysis.act_clipping == "minmax"
    with pytest.raises(InputError, match="act-clipping must be minmax or mse"):
        config.with_analysis(act_clipping="kl")


@pytest.mark.usefixtures("single_thread")  # tiny ops; much slower on a shared CPU otherwise
def test_gptq_rounding_end_to_end(digits_files, tmp_path, capsys):
    """`--rounding gptq`: analyze writes every layer's input second moments (E[x xᵀ] on the
    calibration images), export rounds against them (the checkpoint decodes to exactly the GPTQ
    weights, not the nearest ones); without the file, export fails with one clear line."""
    from safetensors.torch import load_file

    from lcpaq.model.data import load_dataset
    from lcpaq.quant.formats import QuantScheme, get_format
    from lcpaq.quant.input_stats import collect_input_hessians
    from lcpaq.quant.weights import dequantize_weight, quantize_weight

    out = tmp_path / "run"
    args = ["-q", "analyze", "--model", "demo-digits", "--checkpoint"]
    args += [str(digits_files["checkpoint"]), "--calib", str(digits_files["data"])]
    args += ["--normalize", "none", "--num-samples", "16", "--batch-size", "8"]
    args += ["--correction-samples", "16"]
    args += ["--formats", "int2,int3,int4", "--rounding", "gptq", "--gptq-damp", "0.05"]
    assert main([*args, "--out", str(out)]) == 0
    assert main(["-q", "allocate", str(out), "--budget", "avg-bits=3"]) == 0
    assert main(["-q", "export", str(out)]) == 0
    names = ["conv1", "conv2", "conv3", "fc1", "fc2"]
    hessians = load_file(str(out / "input_hessians.safetensors"))
    assert sorted(hessians) == sorted(names)
    assert hessians["conv2"].shape == (144, 144) and hessians["fc1"].shape == (512, 512)
    model = DigitsNet()
    model.load_state_dict(load_file(str(digits_files["checkpoint"])))
    model.eval()
    calib = load_dataset(digits_files["data"], normalization="none").inputs[:16]
    expected = collect_input_hessians(model, names, calib, batch_size=8)
    for name in names:
        assert torch.equal(hessians[name], expected[name]), name

    manifest = json.loads((out / "quantized" / "manifest.json").read_text())
    assert manifest["scheme"]["rounding"] == "gptq" and manifest["scheme"]["gptq_damp"] == 0.05
    scheme = QuantScheme.from_dict(manifest["scheme"])
    assignment = json.loads((out / "allocation.json").read_text())["assignment"]
    _, stored, _ = read_checkpoint(out / "quantized")
    decoded = load_quantized(out / "quantized")
    differs = 0
    for name in names:
        weight = model.get_submodule(name).weight.detach()
        fmt = get_format(assignment[name])
        gptq = quantize_weight(weight, fmt, scheme, hessians[name])
        assert torch.equal(stored[f"{name}.weight"].codes, gptq.codes), name
        assert torch.equal(decoded[f"{name}.weight"], dequantize_weight(gptq)), name
        nearest = quantize_weight(
            weight, fmt, QuantScheme(**{**scheme.to_dict(), "rounding": "nearest"})
        )
        differs += not torch.equal(nearest.codes, gptq.codes)
    assert differs == len(names)  # every layer's codes were changed by the compensation
    reloaded = load_quantized(out / "quantized", DigitsNet())
    for name in names:
        assert torch.equal(reloaded.get_submodule(name).weight, decoded[f"{name}.weight"])
    # sweep measures the uniform baselines outside the candidates (int8) with the same Hessians.
    sweep = ["-q", "sweep", str(out), "--sweep-points", "2", "--eval", str(digits_files["data"])]
    assert main(sweep) == 0

    (out / "input_hessians.safetensors").unlink()
    capsys.readouterr()
    for stage in (["-q", "export", str(out)], sweep):
        _assert_clean_error(capsys, main(stage), "input_hessians.safetensors", "missing")


def test_activation_bit_budgets_quantize_inputs_to_int8_by_default(digits_files, tmp_path):
    """``run --budget bitops-g=…`` without ``--act-formats``: the inputs the cost model counts as
    8-bit are INT8 in the checkpoint; ``--act-formats fp32`` keeps them FP32 (counted as 32)."""
    from lcpaq.config import AllocationConfig, AnalysisConfig, RunConfig
    from lcpaq.stages import pipeline

    config = RunConfig(
        AnalysisConfig(model="m", checkpoint=None, calib="c"),
        AllocationConfig(budgets=("avg-bits=3",)),
    )
    assert pipeline.with_default_activations(config) is config
    latency = config.with_allocation(budgets=("avg-bits=3", "latency-ms=2"))
    assert pipeline.with_default_activations(latency).analysis.act_formats == ("int8",)
    chosen = latency.with_analysis(act_formats=("int4", "int8"))
    assert pipeline.with_default_activations(chosen) is chosen

    runs = {}
    for name, extra in (("default", ()), ("fp32", ("--act-formats", "fp32"))):
        out = tmp_path / name
        args = _run(digits_files, out, "--budget", "bitops-g=1", *extra)
        assert main(args) == 0
        runs[name] = read_manifest(out / "quantized")["layers"]
    assert {entry["activation_quantizer"]["format"] for entry in runs["default"]} == {"int8"}
    assert {entry["activation_format"] for entry in runs["default"]} == {"int8"}
    assert all(entry["activation_quantizer"] is None for entry in runs["fp32"])
    assert {entry["activation_format"] for entry in runs["fp32"]} == {"fp32"}


def test_analyze_with_the_hutchinson_estimator(tmp_path, capsys) -> None:
    """``--estimator hutchinson`` scores with Hutchinson traces (SEs, GN control variate); the
    options round-trip through run_config.json; a cap below 2 probes per layer is an input error."""
    torch.manual_seed(0)
    net = DigitsNet().eval()
    save_file(
        {k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "net.safetensors"
    )
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "data.npz",
        x=rng.integers(0, 255, (24, 1, 8, 8), dtype=np.uint8),
        y=rng.integers(0, 10, 24),
    )
    base = [
        "-q",
        "analyze",
        "--model",
        "demo-digits",
        "--checkpoint",
        str(tmp_path / "net.safetensors"),
    ]
    base += ["--calib", str(tmp_path / "data.npz"), "--normalize", "none", "--num-samples", "24"]
    base += ["--batch-size", "12", "--loss", "kl"]
    exact_out = tmp_path / "gauss-newton"
    assert main([*base, "--out", str(exact_out)]) == 0
    base += ["--estimator", "hutchinson"]
    out = tmp_path / "run"
    probes = ["--hutchinson-probes", "30", "--hutchinson-rel-tol", "0.01"]
    assert main([*base, *probes, "--out", str(out)]) == 0
    curvature = runfolder.load_curvature(out / "curvature.npz")
    assert curvature.method == "hutchinson_single_layer_gn_control"
    assert curvature.num_samples == 24 and curvature.num_probes <= 30
    # KL at the FP32 point has no residual term (H = G): the control-variate probes read only
    # float32 rounding, so the estimate is the exact Gauss-Newton trace with a tiny standard error.
    exact = runfolder.load_curvature(exact_out / "curvature.npz")
    assert exact.method == "gauss_newton" and np.all(exact.trace > 0)
    np.testing.assert_allclose(curvature.trace, exact.trace, rtol=1e-4)
    assert np.all(curvature.trace_stderr < 1e-4 * curvature.trace)
    assert not (out / "hutchinson.npz").exists()
    config = json.loads((out / "run_config.json").read_text())["analysis"]
    assert (config["estimator"], config["hutchinson_probes"], config["loss"]) == (
        "hutchinson",
        30,
        "kl",
    )
    assert (
        RunConfig.from_dict(
            json.loads((out / "run_config.json").read_text())
        ).analysis.hutchinson_rel_tol
        == 0.01
    )
    assert main([*base, "--hutchinson-probes", "6", "--out", str(tmp_path / "bad")]) == 2
    assert "below 2 probes per layer" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "bad")]) == 2
    assert "needs a probe cap" in capsys.readouterr().err
