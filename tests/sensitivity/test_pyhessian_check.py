"""The PyHessian cross-check (`lcpaq.sensitivity.pyhessian_check`) against the explicit Hessian, and
PyHessian's own trace against exact block traces and lcpaq's joint-probe Hutchinson."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import exact_hessian_block_traces
from torch import nn

from lcpaq.errors import InputError
from lcpaq.model.graph import discover_layers
from lcpaq.sensitivity.hutchinson import hutchinson_traces
from lcpaq.sensitivity.pyhessian_check import pyhessian_check

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
def test_exact_block_traces_agree_with_pyhessian() -> None:
    """Whole-model Hutchinson trace from PyHessian vs the sum of exact per-layer block traces
    (all parameters are weights: no bias, no BatchNorm)."""
    pyhessian = pytest.importorskip("pyhessian")
    torch.manual_seed(21)
    model = nn.Sequential(
        nn.Linear(5, 6, bias=False), nn.Tanh(), nn.Linear(6, 3, bias=False)
    ).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(2.0)
    model.eval()
    generator = torch.Generator().manual_seed(22)
    inputs = torch.randn(12, 5, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (12,), generator=generator)
    names = ["0", "2"]
    exact_total = sum(exact_hessian_block_traces(model, names, inputs, labels))

    torch.manual_seed(0)  # PyHessian draws its probes from torch's global RNG
    computer = pyhessian.hessian(model, nn.CrossEntropyLoss(), data=(inputs, labels), cuda=False)
    samples = np.array(computer.trace(maxIter=300, tol=float("-inf")))
    assert len(samples) == 300
    stderr = samples.std(ddof=1) / np.sqrt(len(samples))
    assert abs(samples.mean() - exact_total) <= 4 * stderr
    assert stderr < 0.2 * abs(exact_total)

    # lcpaq's joint-probe Hutchinson reads the same estimator per layer; its sum agrees too.
    fresh = nn.Sequential(nn.Linear(5, 6, bias=False), nn.Tanh(), nn.Linear(6, 3, bias=False))
    fresh = fresh.double().eval()
    fresh.load_state_dict(model.state_dict())
    layers = discover_layers(fresh, inputs)
    ours = hutchinson_traces(fresh, layers, [(inputs, labels)], max_probes=300, rel_tol=0.0)
    ours_total_se = float(np.sqrt((ours.trace_stderr**2).sum()))  # conservative upper bound
    assert abs(ours.trace.sum() - samples.mean()) <= 4 * np.hypot(stderr, ours_total_se)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
def test_pyhessian_backend_trace_and_top_eigenvalue_against_the_explicit_hessian() -> None:
    """`pyhessian_check` over two batches: the trace and top eigenvalue of the Hessian of the mean
    cross-entropy over the layers' weights (biases frozen), against the explicit matrix."""
    pytest.importorskip("pyhessian")
    torch.manual_seed(31)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    generator = torch.Generator().manual_seed(32)
    inputs = torch.randn(16, 4, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (16,), generator=generator)
    layers = discover_layers(model, inputs)
    shapes = [model[0].weight.shape, model[2].weight.shape]
    sizes = [int(np.prod(shape)) for shape in shapes]

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        first, second = flat.split(sizes)
        params = {
            "0.weight": first.view(shapes[0]),
            "0.bias": model[0].bias.detach(),
            "2.weight": second.view(shapes[1]),
            "2.bias": model[2].bias.detach(),
        }
        logits = torch.func.functional_call(model, params, (inputs,))
        return F.cross_entropy(logits, labels)

    flat = torch.cat([model[0].weight.detach().ravel(), model[2].weight.detach().ravel()])
    matrix = torch.autograd.functional.hessian(loss_of, flat)
    exact_trace = float(torch.trace(matrix))
    exact_top = float(torch.linalg.eigvalsh(matrix).max())

    state = torch.random.get_rng_state()
    batches = [(inputs[:8], labels[:8]), (inputs[8:], labels[8:])]
    check = pyhessian_check(model, layers, batches, max_iter=400, tol=-1.0, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert check.num_samples == 16 and check.num_probes == 400
    assert abs(check.trace - exact_trace) <= 4 * check.trace_stderr
    assert check.trace_stderr < 0.2 * abs(exact_trace)
    assert check.top_eigenvalues[0] == pytest.approx(exact_top, rel=1e-3)
    with pytest.raises(InputError, match="pyhessian-iters"):
        pyhessian_check(model, layers, batches, max_iter=1)
