"""`lcpaq.allocation.table`: candidate names and the defaults of tables saved before activation
formats existed (the arrays are measured in `lcpaq.sensitivity.candidates`, tested there)."""

from __future__ import annotations

import numpy as np
import pytest

from lcpaq.allocation.table import (
    DEFAULT_ACTIVATION_FORMAT,
    CandidateTable,
    activation_format_of,
    candidate_name,
    weight_format_of,
)
from lcpaq.errors import InputError


def test_candidate_names_split_into_their_halves() -> None:
    name = candidate_name("int4", "fp8_e4m3", paired=True)
    assert name == "int4/fp8_e4m3"
    assert (weight_format_of(name), activation_format_of(name)) == ("int4", "fp8_e4m3")
    assert candidate_name("int4", "int8", paired=False) == "int4"
    assert (weight_format_of("int4"), activation_format_of("int4")) == (
        "int4",
        DEFAULT_ACTIVATION_FORMAT,
    )


def test_an_unpaired_table_gets_default_halves_and_selects_columns() -> None:
    table = CandidateTable(
        layer_names=("a",),
        format_names=("int2", "int4"),
        num_params=np.array([10]),
        bits=np.array([2, 4]),
        weight_bits=np.array([[20.0, 40.0]]),
        size_bits=np.array([[52.0, 72.0]]),
        error_sq=np.array([[4.0, 1.0]]),
        weighted_error=np.array([[np.nan, np.nan]]),
    )
    assert table.weight_formats == ("int2", "int4") and not table.paired
    assert table.activation_formats == (DEFAULT_ACTIVATION_FORMAT,) * 2
    assert table.output_error is not None and np.isnan(table.output_error).all()
    picked = table.select([1])
    assert picked.format_names == ("int4",) and picked.size_bits.tolist() == [[72.0]]
    assert table.format_index("int4") == 1
    with pytest.raises(InputError, match="not among the analysed candidates"):
        table.format_index("int8")
