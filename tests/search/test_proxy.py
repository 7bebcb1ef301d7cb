"""Proxy scores (`lcpaq.search.proxy`) against their definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import conv_inputs, make_tiny_conv_net

from lcpaq.model.data import Dataset
from lcpaq.search.proxy import ProxyScorer


def test_kl_proxy_oracle():
    model = make_tiny_conv_net()
    inputs = conv_inputs(12)
    labels = torch.zeros(12, dtype=torch.long)
    data = Dataset(inputs, labels, "tiny")
    scorer = ProxyScorer.build("kl", model, data)
    assert scorer.value(scorer.sums(model, 0, 12), 12) == pytest.approx(0.0, abs=1e-12)
    other = make_tiny_conv_net(seed=3)
    with torch.no_grad():
        p = torch.softmax(model(inputs).double(), 1)
        q = torch.softmax(other(inputs).double(), 1)
    expected = float((p * (p.log() - q.log())).sum(1).mean())
    sums = scorer.sums(other, 0, 5) + scorer.sums(other, 5, 12)  # slices add up
    assert scorer.value(sums, 12) == pytest.approx(expected, rel=1e-6)
    sqnr = ProxyScorer.build("sqnr", model, data)
    with torch.no_grad():
        y, e = model(inputs).double(), model(inputs).double() - other(inputs).double()
    expected_db = -10 * np.log10(float(y.pow(2).sum()) / float(e.pow(2).sum()))
    assert sqnr.value(sqnr.sums(other, 0, 12), 12) == pytest.approx(expected_db, rel=1e-6)
