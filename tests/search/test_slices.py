"""Calibration slices (`lcpaq.search.slices`): ``--proxy-samples`` parsing and slice planning."""

from __future__ import annotations

import pytest

from lcpaq.errors import InputError
from lcpaq.search.slices import parse_rungs, plan_slices
from lcpaq.search.space import parse_fix


def test_slices_and_option_parsing():
    assert parse_rungs("128,384,1152") == (128, 384, 1152)
    assert parse_rungs("500") == (500,)
    for bad in ("128,300", "128,384,1000", "0", "a,b"):
        with pytest.raises(InputError):
            parse_rungs(bad)
    slices = plan_slices(5085, (128, 384, 1152), 1024, "calib.npz")
    assert slices.proxy_start == 5085 - 1152 and slices.head == 1024
    with pytest.raises(InputError, match="calib.npz has 2000 images"):
        plan_slices(2000, (128, 384, 1152), 1024, "calib.npz")
    assert parse_fix(["formats=int-pow2", "correction=off"]) == {
        "formats": "int-pow2",
        "correction": "off",
    }
