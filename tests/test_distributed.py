"""Two gloo processes on this machine give the single-process Gauss–Newton result exactly."""

from __future__ import annotations

import pickle
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import conv_inputs, make_tiny_conv_net

from lcpaq.distributed import gauss_newton_traces_distributed
from lcpaq.graph import discover_layers
from lcpaq.hessian import gauss_newton_traces


def _problem() -> tuple[torch.nn.Module, list[torch.Tensor]]:
    model = make_tiny_conv_net(torch.float64)
    inputs = conv_inputs(22, torch.float64)
    return model, [inputs[start : start + 5] for start in range(0, 22, 5)]  # 5 uneven batches


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model, batches = _problem()
        layers = discover_layers(model, batches[0])
        estimate = gauss_newton_traces_distributed(model, layers, batches)
        Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(estimate))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_processes_equal_single_process(tmp_path: Path, single_thread) -> None:
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    model, batches = _problem()
    expected = gauss_newton_traces(model, discover_layers(model, batches[0]), batches)
    for rank in range(2):
        got = pickle.loads(Path(tmp_path, f"rank{rank}.pkl").read_bytes())
        assert got.layer_names == expected.layer_names
        assert got.num_samples == expected.num_samples == 22
        assert got.method == expected.method == "gauss_newton"
        np.testing.assert_array_equal(got.trace, expected.trace)
        np.testing.assert_array_equal(got.trace_stderr, expected.trace_stderr)
        np.testing.assert_array_equal(got.sample_traces, expected.sample_traces)
        assert got.flags == expected.flags
        for name, values in expected.diagonal.items():
            np.testing.assert_allclose(got.diagonal[name], values, rtol=1e-6, atol=0)


def test_without_process_group_it_is_the_single_process_function() -> None:
    model, batches = _problem()
    layers = discover_layers(model, batches[0])
    got = gauss_newton_traces_distributed(model, layers, batches)
    expected = gauss_newton_traces(model, layers, batches)
    np.testing.assert_array_equal(got.trace, expected.trace)
    np.testing.assert_array_equal(got.trace_stderr, expected.trace_stderr)
