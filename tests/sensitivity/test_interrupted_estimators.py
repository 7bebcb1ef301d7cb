"""Every streaming estimator, interrupted at a random batch and resumed from its `StateFile`
(`lcpaq.state_file`, `lcpaq.sensitivity.probe_rounds`), gives bitwise the uninterrupted result and
computes only the batches it had not finished."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import conv_inputs, make_tiny_conv_net, make_tiny_mlp, mlp_inputs
from torch import nn

from lcpaq.errors import InputError
from lcpaq.model.graph import discover_layers
from lcpaq.quant.input_stats import collect_input_hessians
from lcpaq.sensitivity.activation import activation_sensitivity
from lcpaq.sensitivity.gauss_newton import gauss_newton_traces
from lcpaq.sensitivity.hutchinson import hutchinson_traces, single_layer_hutchinson_traces
from lcpaq.state_file import StateFile

pytestmark = pytest.mark.usefixtures("single_thread")

#: Seeds of the interrupt position (a forward call drawn among the run's).
SEEDS = (0, 1, 2)


class Interrupt:
    """Counts the model's forward calls; raises KeyboardInterrupt at call ``at`` (None: never)."""

    def __init__(self, at: int | None = None) -> None:
        self.at, self.calls = at, 0

    def __call__(self, _module: nn.Module, _args: object) -> None:
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt


@contextmanager
def counting(model: nn.Module, at: int | None = None) -> Iterator[Interrupt]:
    hook = Interrupt(at)
    handle = model.register_forward_pre_hook(hook)
    try:
        yield hook
    finally:
        handle.remove()


def _arrays(result: object) -> dict[str, np.ndarray]:
    """Every array-like field of an estimator's result (dict or dataclass), as numpy."""
    items = result.items() if isinstance(result, dict) else vars(result).items()
    found: dict[str, np.ndarray] = {}
    for name, value in items:
        if isinstance(value, dict):
            found.update({f"{name}/{key}": np.asarray(v) for key, v in _arrays(value).items()})
        elif isinstance(value, (np.ndarray, torch.Tensor, float, int, tuple)):
            found[name] = np.asarray(value)
    return found


def _assert_bitwise_equal(resumed: object, full: object) -> None:
    left, right = _arrays(resumed), _arrays(full)
    assert left.keys() == right.keys()
    for name in left:
        np.testing.assert_array_equal(left[name], right[name], err_msg=name)


def _interrupt_and_resume(
    tmp_path: Path, model: nn.Module, estimate: Callable[[StateFile], object], seed: int
) -> tuple[int, int, int]:
    """Run ``estimate`` whole, then interrupted at a random forward call and resumed; the resumed
    result must equal the whole one bitwise. Returns (forward calls of the whole run, of the
    resumed run, the call that was interrupted)."""
    with counting(model) as full_count:
        full = estimate(StateFile())
    at = int(np.random.default_rng(seed).integers(2, full_count.calls + 1))
    state = StateFile(tmp_path / "state.safetensors", key="k", every_s=0)
    with counting(model, at) as interrupt, pytest.raises(KeyboardInterrupt):
        estimate(state)
    assert interrupt.calls == at
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []
    with counting(model) as resumed_count:
        resumed = estimate(StateFile(state.path, key="k", every_s=0))
    _assert_bitwise_equal(resumed, full)
    return full_count.calls, resumed_count.calls, at


def _conv_case(count: int = 24, batch: int = 4):
    model = make_tiny_conv_net()
    inputs = conv_inputs(count)
    labels = torch.randint(0, 3, (count,), generator=torch.Generator().manual_seed(2))
    layers = discover_layers(model, inputs)
    batches = [inputs[start : start + batch] for start in range(0, count, batch)]
    labelled = [
        (x, labels[start : start + batch]) for x, start in zip(batches, range(0, count, batch))
    ]
    return model, layers, batches, labelled


@pytest.mark.parametrize("seed", SEEDS)
def test_gauss_newton_resumes_exactly(tmp_path, seed):
    model, layers, batches, _ = _conv_case()
    full, resumed, at = _interrupt_and_resume(
        tmp_path,
        model,
        lambda state: gauss_newton_traces(model, layers, batches, state_file=state),
        seed,
    )
    assert resumed == full - (at - 1)  # one forward pass per batch; the finished ones are kept


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_sampled_fisher_resumes_its_generator(tmp_path, seed):
    """Past 64 classes the labels are drawn from the estimator's generator: resuming restores
    its state, so the draws (and the traces) are those of the uninterrupted run."""
    model = make_tiny_mlp(seed=3)
    model.fc2 = nn.Linear(8, 80)
    inputs = mlp_inputs(48)
    layers = discover_layers(model, inputs)
    batches = [inputs[start : start + 4] for start in range(0, 48, 4)]
    full, resumed, at = _interrupt_and_resume(
        tmp_path,
        model,
        lambda state: gauss_newton_traces(model, layers, batches, seed=5, state_file=state),
        seed,
    )
    assert resumed == full - (at - 1)


@pytest.mark.parametrize("seed", SEEDS)
def test_joint_hutchinson_resumes_exactly(tmp_path, seed):
    model, layers, _, labelled = _conv_case(count=12)
    full, resumed, at = _interrupt_and_resume(
        tmp_path,
        model,
        lambda state: hutchinson_traces(
            model,
            layers,
            labelled,
            max_probes=12,
            probes_per_round=3,
            rel_tol=0.0,
            state_file=state,
        ),
        seed,
    )
    assert resumed == full - (at - 1)  # finished rounds are replayed from the file


@pytest.mark.parametrize("seed", SEEDS)
def test_single_layer_hutchinson_with_control_resumes_exactly(tmp_path, seed):
    """On the tanh MLP the control variate leaves a residual to estimate: several rounds."""
    model = make_tiny_mlp(seed=1)
    inputs = mlp_inputs(24)
    labels = torch.randint(0, 3, (24,), generator=torch.Generator().manual_seed(2))
    layers = discover_layers(model, inputs)
    labelled = [(inputs[start : start + 4], labels[start : start + 4]) for start in range(0, 24, 4)]
    control = gauss_newton_traces(model, layers, [x for x, _ in labelled], keep_diagonal=False)
    full, resumed, at = _interrupt_and_resume(
        tmp_path,
        model,
        lambda state: single_layer_hutchinson_traces(
            model,
            layers,
            labelled,
            rel_tol=1e-3,
            min_probes=2,
            max_probes_per_layer=6,
            gauss_newton=control,
            state_file=state,
        ),
        seed,
    )
    assert resumed == full - (at - 1)


@pytest.mark.parametrize("clipping", ["minmax", "mse"])
@pytest.mark.parametrize("seed", SEEDS)
def test_activation_sensitivity_resumes_exactly(tmp_path, seed, clipping):
    model, layers, batches, _ = _conv_case()
    full, resumed, at = _interrupt_and_resume(
        tmp_path,
        model,
        lambda state: activation_sensitivity(
            model, layers, batches, ["int4", "int8"], clipping=clipping, state_file=state
        ),
        seed,
    )
    # Pass 1 (ranges, one forward per batch) is saved when it ends; pass 2 after every batch.
    assert resumed == (full if at <= len(batches) else full - (at - 1))


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_input_hessians_resume_exactly(tmp_path, seed):
    model, layers, batches, _ = _conv_case()
    inputs = torch.cat(batches)
    names = [layer.name for layer in layers]
    full, resumed, at = _interrupt_and_resume(
        tmp_path,
        model,
        lambda state: collect_input_hessians(model, names, inputs, batch_size=4, state_file=state),
        seed,
    )
    assert resumed == full - (at - 1)


def test_a_snapshot_of_another_analysis_is_refused(tmp_path):
    model, layers, batches, _ = _conv_case()
    path = tmp_path / "state.safetensors"
    gauss_newton_traces(model, layers, batches[:2], state_file=StateFile(path, key="a"))
    with pytest.raises(InputError, match="another analysis"):
        gauss_newton_traces(model, layers, batches, state_file=StateFile(path, key="b"))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(InputError, match="damaged"):
        gauss_newton_traces(model, layers, batches, state_file=StateFile(path, key="a"))


def test_snapshots_follow_the_interval(tmp_path):
    """``every_s`` > 0 writes far fewer snapshots than batches; the last batch is always saved."""
    model, layers, batches, _ = _conv_case(count=40)
    state = StateFile(tmp_path / "state.safetensors", key="k", every_s=3600)
    gauss_newton_traces(model, layers, batches, state_file=state)
    assert state.writes == 1
    every = StateFile(tmp_path / "every.safetensors", key="k", every_s=0)
    gauss_newton_traces(model, layers, batches, state_file=every)
    assert every.writes == len(batches)
