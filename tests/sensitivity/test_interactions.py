"""Inter-layer terms in `lcpaq.sensitivity.interactions` against explicit Hessian / Gauss–Newton blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_conv_net, make_tiny_mlp, weight_jacobians
from torch import nn

from lcpaq.model.graph import discover_layers
from lcpaq.quant.formats import QuantScheme, get_format
from lcpaq.quant.weights import fake_quantize
from lcpaq.sensitivity.interactions import (
    compute_interactions,
    hessian_cross_terms,
    load_interactions,
    measured_interactions,
    pair_formats,
    residual_block,
    select_pairs,
)

pytestmark = pytest.mark.usefixtures("single_thread")

FORMATS = ("int2", "int3", "int4")


def _model_and_data(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(31)
    if kind == "mlp":
        model = make_tiny_mlp(torch.float64)
        inputs = torch.randn(10, 5, generator=generator, dtype=torch.float64)
    else:
        model = make_tiny_conv_net(torch.float64)
        inputs = torch.randn(10, 1, 6, 6, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(2.0)
    labels = torch.randint(0, 3, (10,), generator=generator)
    return model, inputs, labels


def _deltas(model: nn.Module, names: list[str]) -> list[list[torch.Tensor]]:
    result = []
    for name in names:
        weight = model.get_submodule(name).weight.detach()
        result.append(
            [fake_quantize(weight, get_format(f), QuantScheme()) - weight for f in FORMATS]
        )
    return result


def _explicit_hessian(
    model: nn.Module, names: list[str], inputs: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, list[int]]:
    """Full Hessian of the mean cross-entropy over the concatenated layer weights."""
    params = {key: value.detach() for key, value in model.named_parameters()}
    params.update(dict(model.named_buffers()))
    shapes = [params[f"{name}.weight"].shape for name in names]
    sizes = [int(np.prod(shape)) for shape in shapes]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        values = dict(params)
        for name, part, shape in zip(names, flat.split(sizes), shapes):
            values[f"{name}.weight"] = part.reshape(shape)
        return F.cross_entropy(torch.func.functional_call(model, values, (inputs,)), labels)

    flat = torch.cat([params[f"{name}.weight"].reshape(-1) for name in names])
    return torch.autograd.functional.hessian(loss, flat), sizes


def _block_product(matrix, sizes, deltas, i, j, f, g) -> float:
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    block = matrix[offsets[i] : offsets[i + 1], offsets[j] : offsets[j + 1]]
    return float(deltas[i][f].reshape(-1) @ block @ deltas[j][g].reshape(-1))


@pytest.mark.parametrize("kind", ["mlp", "tiny_conv"])
def test_hessian_cross_terms_match_explicit_blocks(kind: str) -> None:
    model, inputs, labels = _model_and_data(kind)
    layers = discover_layers(model, inputs)
    names = [layer.name for layer in layers]
    batches = [(inputs[:4], labels[:4]), (inputs[4:], labels[4:])]  # unequal sizes on purpose
    terms = hessian_cross_terms(
        model, layers, batches, FORMATS, pairs=select_pairs(len(layers), "all")
    )
    matrix, sizes = _explicit_hessian(model, names, inputs, labels)
    deltas = _deltas(model, names)
    assert terms.method == "hessian" and terms.num_samples == 10
    assert terms.pairs == select_pairs(len(layers), "all")
    for i, j in terms.pairs:
        expected = np.array(
            [
                [_block_product(matrix, sizes, deltas, i, j, f, g) for g in range(3)]
                for f in range(3)
            ]
        )
        assert np.abs(expected).max() > 1e-6  # the oracle is not trivially zero
        np.testing.assert_allclose(terms.cross[(i, j)], expected, rtol=1e-8, atol=1e-12)
        assert np.all(np.isfinite(terms.stderr[(i, j)]))
    for k in range(len(layers)):
        expected = [_block_product(matrix, sizes, deltas, k, k, f, f) for f in range(3)]
        np.testing.assert_allclose(terms.diagonal[k], expected, rtol=1e-8, atol=1e-12)
    # The model's weights are unchanged and keep their requires_grad flags.
    assert all(parameter.requires_grad for parameter in model.parameters())


@pytest.mark.parametrize("kind", ["mlp", "tiny_conv"])
def test_gauss_newton_cross_terms_match_explicit_blocks(kind: str) -> None:
    model, inputs, labels = _model_and_data(kind)
    layers = discover_layers(model, inputs)
    names = [layer.name for layer in layers]
    terms = hessian_cross_terms(
        model,
        layers,
        [(inputs[:3], labels[:3]), (inputs[3:], labels[3:])],
        FORMATS,
        pairs=select_pairs(len(layers), "all"),
        curvature="gauss_newton",
    )
    logits, jacobians = weight_jacobians(model, names, inputs)
    probs = torch.softmax(logits, -1)
    h_out = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    deltas = _deltas(model, names)
    count = len(inputs)
    for i, j in [*terms.pairs, *[(k, k) for k in range(len(layers))]]:
        gn_block = torch.einsum("ncp,ncd,ndq->pq", jacobians[i], h_out, jacobians[j]) / count
        expected = np.array(
            [
                [
                    float(deltas[i][f].reshape(-1) @ gn_block @ deltas[j][g].reshape(-1))
                    for g in range(3)
                ]
                for f in range(3)
            ]
        )
        if i != j:
            np.testing.assert_allclose(terms.cross[(i, j)], expected, rtol=1e-8, atol=1e-12)
        else:
            np.testing.assert_allclose(terms.diagonal[i], np.diagonal(expected), rtol=1e-8)
    # Standard errors are over samples: std of the per-sample terms / sqrt(N).
    assert all(np.all(np.isfinite(error)) for error in terms.stderr.values())


def test_gauss_newton_mse_matches_explicit_blocks() -> None:
    model, inputs, labels = _model_and_data("mlp")
    layers = discover_layers(model, inputs)
    names = [layer.name for layer in layers]
    terms = hessian_cross_terms(
        model, layers, [(inputs, labels)], FORMATS, curvature="gauss_newton", loss="mse"
    )
    _, jacobians = weight_jacobians(model, names, inputs)
    deltas = _deltas(model, names)
    classes = 3
    block = (2.0 / classes) * torch.einsum("ncp,ncq->pq", jacobians[0], jacobians[1]) / len(inputs)
    expected = float(deltas[0][0].reshape(-1) @ block @ deltas[1][2].reshape(-1))
    np.testing.assert_allclose(terms.cross[(0, 1)][0, 2], expected, rtol=1e-8)


class TwoBranchNet(nn.Module):
    """Two independent non-linear branches summed: with a loss linear in the output, a layer of one
    branch cannot change the effect of quantizing a layer of the other."""

    def __init__(self) -> None:
        super().__init__()
        self.a1, self.a2 = nn.Linear(5, 6), nn.Linear(6, 3)
        self.b1, self.b2 = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a2(torch.tanh(self.a1(x))) + self.b2(torch.tanh(self.b1(x)))


def _linear_loss(logits: torch.Tensor, _labels: torch.Tensor | None) -> torch.Tensor:
    return logits @ torch.tensor([1.0, -2.0, 0.5], dtype=logits.dtype)


def test_measured_interactions_vanish_for_independent_branches() -> None:
    torch.manual_seed(4)
    model = TwoBranchNet().double().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3.0)
    inputs = torch.randn(200, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    layers = discover_layers(model, inputs)
    names = [layer.name for layer in layers]
    before = {key: value.clone() for key, value in model.state_dict().items()}
    terms = measured_interactions(
        model,
        layers,
        inputs,
        None,
        ("int2", "int4"),
        pairs=select_pairs(len(layers), "all"),
        loss=_linear_loss,
    )
    assert terms.method == "measured" and terms.num_samples == 200
    for key, value in model.state_dict().items():  # weights are restored
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    branch = {name: name[0] for name in names}
    within = []
    for (i, j), value in terms.cross.items():
        error = terms.stderr[(i, j)]
        if branch[names[i]] != branch[names[j]]:
            assert np.all(np.abs(value) <= 3 * error + 1e-12), (names[i], names[j], value)
            assert np.abs(value).max() < 1e-10  # zero up to rounding, not just within noise
        else:
            within.append(np.abs(value).max())
    # Within a branch the interaction is real: the check has teeth.
    assert max(within) > 1e-3
    assert np.all(np.abs(terms.diagonal) > 0)


def test_measured_interaction_matches_hessian_for_small_perturbations() -> None:
    """For a mild format the measured cross term approaches the Hessian's Δw_iᵀH_ijΔw_j."""
    model, inputs, labels = _model_and_data("mlp")
    layers = discover_layers(model, inputs)
    measured = measured_interactions(model, layers, inputs, labels, ("int8",))
    curvature = hessian_cross_terms(model, layers, [(inputs, labels)], ("int8",))
    value, expected = measured.cross[(0, 1)][0, 0], curvature.cross[(0, 1)][0, 0]
    assert abs(expected) > 1e-9
    np.testing.assert_allclose(value, expected, rtol=0.05)


def test_kl_loss_is_label_free_and_nonnegative() -> None:
    model, inputs, _ = _model_and_data("tiny_conv")
    layers = discover_layers(model, inputs)
    terms = measured_interactions(model, layers, inputs, None, ("int2", "int4"), loss="kl")
    assert np.all(terms.diagonal >= 0)
    with pytest.raises(ValueError, match="needs labels"):
        measured_interactions(model, layers, inputs, None, ("int4",))


def test_select_pairs_and_validation() -> None:
    assert select_pairs(4, "window", 1) == ((0, 1), (1, 2), (2, 3))
    assert select_pairs(4, "window", 2) == ((0, 1), (0, 2), (1, 2), (1, 3), (2, 3))
    assert len(select_pairs(5, "all")) == 10
    with pytest.raises(ValueError, match="rule"):
        select_pairs(3, "blocks")  # type: ignore[arg-type]
    model, inputs, labels = _model_and_data("mlp")
    layers = discover_layers(model, inputs)
    with pytest.raises(ValueError, match="pair"):
        hessian_cross_terms(model, layers, [(inputs, labels)], ("int4",), pairs=[(1, 0)])
    with pytest.raises(ValueError, match="curvature"):
        hessian_cross_terms(model, layers, [(inputs, labels)], ("int4",), curvature="x")  # type: ignore[arg-type]


def test_save_and_load_round_trip(tmp_path) -> None:
    from lcpaq.sensitivity.interactions import save_interactions

    model, inputs, labels = _model_and_data("tiny_conv")
    layers = discover_layers(model, inputs)
    terms = hessian_cross_terms(
        model, layers, [(inputs[:5], labels[:5]), (inputs[5:], labels[5:])], FORMATS
    )
    path = save_interactions(tmp_path / "interactions.npz", terms)
    loaded = load_interactions(path)
    assert loaded.layer_names == terms.layer_names
    assert loaded.format_names == terms.format_names
    assert loaded.method == terms.method and loaded.num_samples == terms.num_samples
    assert loaded.pairs == terms.pairs
    for pair in terms.pairs:
        np.testing.assert_array_equal(loaded.cross[pair], terms.cross[pair])
        np.testing.assert_array_equal(loaded.stderr[pair], terms.stderr[pair])
    np.testing.assert_array_equal(loaded.diagonal, terms.diagonal)
    significant = terms.significant()
    for pair, value in significant.items():
        kept = np.abs(terms.cross[pair]) >= 2 * terms.stderr[pair]
        np.testing.assert_array_equal(value[~kept], 0.0)


def test_block_rule_pairs_layers_of_one_residual_block() -> None:
    names = [
        "conv1",
        "layer1.0.conv1",
        "layer1.0.conv2",
        "layer1.0.downsample.0",
        "layer1.1.conv1",
        "layer1.1.conv2",
        "fc",
    ]
    assert residual_block("layer1.0.downsample.0") == "layer1.0"
    assert residual_block("layer2.1.shortcut.conv") == "layer2.1"
    assert residual_block("fc") == ""
    assert select_pairs(len(names), "block", layer_names=names) == ((1, 2), (1, 3), (2, 3), (4, 5))
    with pytest.raises(ValueError, match="layer name"):
        select_pairs(3, "block")


def test_pair_formats_keep_the_narrow_formats() -> None:
    names = ("int2", "int3", "int4", "int5", "int8", "fp4_e2m1", "fp8_e4m3")
    assert pair_formats(names, 4) == ("int2", "int3", "int4", "fp4_e2m1")
    assert pair_formats(names, 8) == names
    assert pair_formats(names, 1) == ()


@pytest.mark.parametrize("source", ["hessian", "gauss-newton", "forward"])
def test_compute_interactions_dispatches_to_the_estimators(source: str) -> None:
    model, inputs, labels = _model_and_data("tiny_conv")
    layers = discover_layers(model, inputs)
    pairs = select_pairs(len(layers), "all")
    terms = compute_interactions(
        model, layers, inputs, labels, FORMATS[:2], source=source, pairs=pairs, batch_size=4
    )
    if source == "forward":
        expected = measured_interactions(
            model, layers, inputs, labels, FORMATS[:2], pairs=pairs, loss="kl"
        )
    else:
        batches = [(inputs[:4], labels[:4]), (inputs[4:8], labels[4:8]), (inputs[8:], labels[8:])]
        curvature = "hessian" if source == "hessian" else "gauss_newton"
        expected = hessian_cross_terms(
            model, layers, batches, FORMATS[:2], pairs=pairs, curvature=curvature
        )
    assert terms.method == expected.method and terms.pairs == pairs
    for pair in pairs:
        np.testing.assert_allclose(terms.cross[pair], expected.cross[pair], rtol=1e-12, atol=0)
        np.testing.assert_allclose(terms.stderr[pair], expected.stderr[pair], rtol=1e-12, atol=0)
    if source == "hessian":  # three batches: standard errors over batches exist
        assert all(np.all(np.isfinite(error)) for error in terms.stderr.values())
        with pytest.raises(ValueError, match="labels"):
            compute_interactions(
                model, layers, inputs, None, FORMATS[:1], source=source, pairs=pairs
            )
    with pytest.raises(ValueError, match="source"):
        compute_interactions(
            model,
            layers,
            inputs,
            labels,
            FORMATS[:1],
            source="magic",
            pairs=pairs,  # type: ignore[arg-type]
        )
