"""`lcpaq.allocation.budgets`: budget texts, tie texts, tie rules and the units tied layers form."""

from __future__ import annotations

import numpy as np
import pytest

from lcpaq.allocation.budgets import (
    Budget,
    counts_activation_bits,
    parse_budget,
    parse_tie,
    tie_rule_groups,
    tie_units,
)
from lcpaq.errors import InputError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("avg-bits=3", Budget("avg-bits", 3.0)),
        ("size-mb=0.12", Budget("size-mb", 0.12)),
        (" avg-bits = 2.5", Budget("avg-bits", 2.5)),
        ("size-mb=1e-2", Budget("size-mb", 0.01)),
        ("size-frac=0.25", Budget("size-frac", 0.25)),
        ("bitops-g=1.5", Budget("bitops-g", 1.5)),
        ("ebops-g=2", Budget("ebops-g", 2.0)),
        ("latency-ms=2", Budget("latency-ms", 2.0)),
    ],
)
def test_parse_budget(text: str, expected: Budget) -> None:
    assert parse_budget(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("avg-bits=-1", "positive"),
        ("avg-bits=0", "positive"),
        ("avg-bits=nan", "positive"),
        ("size-mb=inf", "positive"),
        ("latency=3", "unknown metric 'latency'; known: avg-bits, size-mb, size-frac, bitops-g"),
        ("avg-bits=three", "'three' is not a number"),
        ("avg-bits=", "is not a number"),
        ("avg-bits", "expected METRIC=VALUE"),
    ],
)
def test_parse_budget_errors(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        parse_budget(text)


def test_counts_activation_bits() -> None:
    assert counts_activation_bits(["avg-bits=3", "bitops-g=2"])
    assert not counts_activation_bits(["avg-bits=3", "size-mb=1"])


def test_tie_texts_and_rules() -> None:
    names = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.0.downsample.0", "fc"]
    assert tie_rule_groups(names, "none") == []
    assert tie_rule_groups(names, "downsample") == [("layer1.0.conv1", "layer1.0.downsample.0")]
    with pytest.raises(InputError, match="unknown tie rule"):
        tie_rule_groups(names, "nope")
    assert parse_tie(" a, b ,a") == ("a", "b")
    with pytest.raises(InputError, match="at least two layer names"):
        parse_tie("a")


def test_tie_units_merge_groups_transitively() -> None:
    names = ["a", "b", "c", "d", "e"]
    # (d, b) and (b, e) chain into one unit; units are numbered by their first layer.
    np.testing.assert_array_equal(tie_units(names, [("d", "b"), ("b", "e")]), [0, 1, 2, 1, 1])
    np.testing.assert_array_equal(tie_units(names, []), [0, 1, 2, 3, 4])
    with pytest.raises(InputError, match="cannot tie layer 'x'"):
        tie_units(names, [("a", "x")])
