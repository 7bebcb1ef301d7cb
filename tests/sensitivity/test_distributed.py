"""Two gloo processes on this machine give the single-process results: Gauss–Newton and activation
curvature exactly, Hutchinson to float rounding; and ``torchrun … lcpaq.cli analyze`` writes the
same run folder as a single-process ``lcpaq analyze``."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import REPO_ROOT, conv_inputs, digits_command, make_tiny_conv_net
from safetensors.torch import save_file

from lcpaq.cli import main
from lcpaq.model.demo import DigitsNet
from lcpaq.model.graph import discover_layers
from lcpaq.sensitivity.activation import activation_sensitivity
from lcpaq.sensitivity.batch_share import BatchShare
from lcpaq.sensitivity.distributed import (
    batch_share,
    is_main_process,
    rank_and_world,
)
from lcpaq.sensitivity.gauss_newton import gauss_newton_traces
from lcpaq.sensitivity.hutchinson import hutchinson_traces, single_layer_hutchinson_traces

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is unavailable")

ACTIVATION_FORMATS = ("int8", "int4", "fp8_e4m3")


def _problem() -> tuple[torch.nn.Module, list[torch.Tensor], list[tuple[torch.Tensor, None]]]:
    model = make_tiny_conv_net(torch.float64)
    inputs = conv_inputs(22, torch.float64)
    batches = [inputs[start : start + 5] for start in range(0, 22, 5)]  # 5 uneven batches
    return model, batches, [(batch, None) for batch in batches]


def measure_all(share_all: bool) -> dict[str, object]:
    """Every collective measurement, in one order; with ``share_all`` the process-group versions
    (tests/sensitivity/distributed_worker.py calls this in each torchrun process)."""
    model, batches, labelled = _problem()
    layers = discover_layers(model, batches[0])
    share = batch_share()
    if share_all:
        gauss_newton = gauss_newton_traces(model, layers, batches, share=share)
        activations = activation_sensitivity(
            model, layers, batches, ACTIVATION_FORMATS, loss="kl", share=share
        )
    else:
        gauss_newton = gauss_newton_traces(model, layers, batches)
        activations = activation_sensitivity(model, layers, batches, ACTIVATION_FORMATS, loss="kl")
    single = single_layer_hutchinson_traces(
        model, layers, labelled, rel_tol=0.1, max_probes_per_layer=12, loss="kl", share=share
    )
    joint = hutchinson_traces(model, layers, labelled, max_probes=10, loss="kl", share=share)
    return {"gn": gauss_newton, "act": activations, "single": single, "joint": joint}


def test_without_process_group_it_is_the_single_process_function() -> None:
    model, batches, _ = _problem()
    layers = discover_layers(model, batches[0])
    assert rank_and_world() == (0, 1) and is_main_process()
    share = batch_share()
    assert share == BatchShare()
    assert share.in_batch_order(["a", "b"], 2) == ["a", "b"]
    got = gauss_newton_traces(model, layers, batches, share=share)
    expected = gauss_newton_traces(model, layers, batches)
    np.testing.assert_array_equal(got.trace, expected.trace)
    np.testing.assert_array_equal(got.trace_stderr, expected.trace_stderr)


def _analyze_args(files: Path, out: Path) -> list[str]:
    return digits_command(
        "analyze",
        files / "net.safetensors",
        files / "data.npz",
        "--num-samples",
        "40",
        "--batch-size",
        "8",
        "--loss",
        "kl",
        "--act-formats",
        "int8,int4",
        "--hutchinson-probes",
        "6",
        "--out",
        str(out),
    )


def test_torchrun_equals_single_process(tmp_path: Path, single_thread) -> None:
    """Two gloo processes under torchrun: the library measurements (5 uneven batches split 3/2),
    then ``lcpaq.cli analyze`` (5 batches), against the same calls in this one process."""
    torch.manual_seed(0)
    model = DigitsNet().eval()
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    save_file(state, tmp_path / "net.safetensors")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (40, 1, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "data.npz", x=images, y=rng.integers(0, 10, 40))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")]),
    }
    two = tmp_path / "two"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
            *(
                "--nproc-per-node",
                "2",
                str(REPO_ROOT / "tests" / "sensitivity" / "distributed_worker.py"),
            ),
            str(tmp_path),
            *_analyze_args(tmp_path, two),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    expected = measure_all(share_all=False)
    gn, act = expected["gn"], expected["act"]
    assert gn.num_samples == act.num_samples == 22
    for rank in range(2):
        got = pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes())
        assert got["gn"].layer_names == gn.layer_names
        assert got["gn"].method == gn.method == "gauss_newton"
        np.testing.assert_array_equal(got["gn"].trace, gn.trace)
        np.testing.assert_array_equal(got["gn"].trace_stderr, gn.trace_stderr)
        np.testing.assert_array_equal(got["gn"].sample_traces, gn.sample_traces)
        assert got["gn"].flags == gn.flags
        for name, values in gn.diagonal.items():
            np.testing.assert_allclose(got["gn"].diagonal[name], values, rtol=1e-6, atol=0)
        for field in ("trace", "trace_stderr", "noise", "weighted", "low", "high"):
            np.testing.assert_array_equal(getattr(got["act"], field), getattr(act, field))
        np.testing.assert_array_equal(got["act"].num_elements, act.num_elements)
        # Hutchinson: the same probes in every process, per-probe sums added in another order.
        for key in ("single", "joint"):
            assert got[key].num_probes == expected[key].num_probes
            np.testing.assert_allclose(got[key].trace, expected[key].trace, rtol=1e-10)
            np.testing.assert_allclose(got[key].trace_stderr, expected[key].trace_stderr, rtol=1e-8)
        np.testing.assert_array_equal(
            got["single"].probes_per_layer, expected["single"].probes_per_layer
        )

    # The CLI path: only rank 0 wrote, and the run folder is the single-process one.
    one = tmp_path / "one"
    assert main(_analyze_args(tmp_path, one)) == 0
    for name in ("curvature.npz", "activations.npz", "candidates.npz", "hutchinson.npz"):
        with np.load(one / name) as single, np.load(two / name) as multi:
            assert single.files == multi.files
            for key in single.files:
                if key.startswith("diagonal/") or key == "weighted_error":
                    np.testing.assert_allclose(multi[key], single[key], rtol=1e-6)
                elif name == "hutchinson.npz" and key in ("trace", "trace_stderr"):
                    np.testing.assert_allclose(multi[key], single[key], rtol=1e-9)
                else:
                    np.testing.assert_array_equal(multi[key], single[key], err_msg=f"{name}:{key}")
    assert sorted(path.name for path in two.iterdir()) == sorted(
        path.name for path in one.iterdir()
    )
