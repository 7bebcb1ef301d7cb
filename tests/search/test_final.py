"""The final step (`lcpaq.search.final`): the rule that keeps lcpaq's default unless the best
beats it beyond the noise of the evaluation data."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lcpaq.config import AnalysisConfig, RunConfig
from lcpaq.errors import InputError
from lcpaq.model.evaluate import Accuracy
from lcpaq.search.final import keep_default_unless_better
from lcpaq.search.options import SearchOptions


def test_default_is_kept_unless_the_best_beats_it_beyond_the_noise():
    """The selection rule: a gain within min_gain_se paired SE keeps the default."""

    def accuracy(correct: list[int]) -> Accuracy:
        values = np.array(correct, dtype=bool)
        return Accuracy(float(values.mean()), 0.0, len(values), values)

    trial = SimpleNamespace  # the rule reads only .number
    default, best = trial(number=0), trial(number=7)
    base = np.array([1, 0] * 50)
    better = base.copy()
    better[[1, 3]] = 1  # +2 points on 100 images: 1.4 paired SE
    evaluations = {0: accuracy(list(base)), 7: accuracy(list(better))}
    rule = keep_default_unless_better
    assert rule(best, default, evaluations, 2.0) is default
    assert rule(best, default, evaluations, 1.0) is best
    assert rule(best, None, evaluations, 2.0) is best  # no default evaluated: nothing to keep
    assert rule(default, default, evaluations, 2.0) is default
    with pytest.raises(InputError, match="min-gain-se"):
        SearchOptions(base=RunConfig(AnalysisConfig("m", None, "c")), out=Path("o"), min_gain_se=-1)
