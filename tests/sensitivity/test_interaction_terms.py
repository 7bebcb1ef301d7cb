"""Pair selection and the ``interactions.npz`` round trip (`lcpaq.sensitivity.interaction_terms`)."""

from __future__ import annotations

import numpy as np
import pytest
from interaction_cases import FORMATS, model_and_data

from lcpaq.model.graph import discover_layers
from lcpaq.sensitivity.cross_terms import hessian_cross_terms
from lcpaq.sensitivity.interaction_terms import (
    InteractionTerms,
    load_interactions,
    residual_block,
    save_interactions,
    select_pairs,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def test_select_pairs_and_validation() -> None:
    assert select_pairs(4, "window", 1) == ((0, 1), (1, 2), (2, 3))
    assert select_pairs(4, "window", 2) == ((0, 1), (0, 2), (1, 2), (1, 3), (2, 3))
    assert len(select_pairs(5, "all")) == 10
    with pytest.raises(ValueError, match="rule"):
        select_pairs(3, "blocks")  # type: ignore[arg-type]
    model, inputs, labels = model_and_data("mlp")
    layers = discover_layers(model, inputs)
    with pytest.raises(ValueError, match="pair"):
        hessian_cross_terms(model, layers, [(inputs, labels)], ("int4",), pairs=[(1, 0)])
    with pytest.raises(ValueError, match="curvature"):
        hessian_cross_terms(model, layers, [(inputs, labels)], ("int4",), curvature="x")  # type: ignore[arg-type]


def test_save_and_load_round_trip(tmp_path) -> None:
    model, inputs, labels = model_and_data("tiny_conv")
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


def test_stacked_and_header_follow_pair_order() -> None:
    cross = {(1, 2): np.full((2, 2), 3.0), (0, 1): np.eye(2)}
    terms = InteractionTerms(
        layer_names=("a", "b", "c"),
        format_names=("int4", "int8"),
        cross=cross,
        stderr={pair: 0.1 * block for pair, block in cross.items()},
        diagonal=np.zeros((3, 2)),
        diagonal_stderr=np.zeros((3, 2)),
        method="hessian",
        num_samples=7,
    )
    blocks, errors = terms.stacked()
    assert blocks.shape == errors.shape == (2, 2, 2)
    np.testing.assert_array_equal(blocks[0], np.eye(2))  # (0, 1) before (1, 2)
    np.testing.assert_allclose(errors[1], np.full((2, 2), 0.3))
    assert terms.header() == {
        "method": "hessian",
        "num_samples": 7,
        "formats": ["int4", "int8"],
        "num_pairs": 2,
        "num_terms": 8,
    }
