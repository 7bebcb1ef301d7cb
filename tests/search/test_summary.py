"""The search's tables and report (`lcpaq.search.summary`): one row per trial with the proxy at
the largest slice it reached; the Markdown report states the choice and the comparison."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from lcpaq.model.evaluate import Accuracy
from lcpaq.search.runner import Search
from lcpaq.search.space import SearchSpace
from lcpaq.search.summary import TIMING_KEYS, report_markdown, rows_of


def _trial(number: int, state: TrialState, steps: dict[int, float], **attrs: Any):
    trial = optuna.trial.create_trial(
        state=state,
        params={"clipping": "mse"},
        distributions={"clipping": CategoricalDistribution(("mse", "minmax"))},
        value=steps[max(steps)] if state == TrialState.COMPLETE else None,
        intermediate_values=steps,
        user_attrs=attrs,
    )
    trial.number = number
    return trial


def test_rows_take_the_proxy_at_the_largest_slice_reached():
    search = cast(
        Search,
        SimpleNamespace(options=SimpleNamespace(rungs=(16, 48)), space=SearchSpace.default()),
    )
    complete = _trial(0, TrialState.COMPLETE, {16: 0.5, 48: 0.4}, default=True, proxy_s=1.5)
    pruned = _trial(1, TrialState.PRUNED, {16: 0.9}, avg_bits=3.0)
    infeasible = _trial(2, TrialState.PRUNED, {}, error="infeasible")
    correct = np.array([True, False, True, True])
    evaluations = {0: Accuracy(0.75, 0.0, 4, correct)}
    rows = rows_of(search, [complete, pruned, infeasible], evaluations)
    assert [row["proxy"] for row in rows] == [0.4, 0.9, None]
    assert [row["proxy_images"] for row in rows] == [48, 16, None]
    assert (rows[1]["proxy_16"], rows[1]["proxy_48"]) == (0.9, None)
    assert [row["top1"] for row in rows] == [0.75, None, None]
    assert [row["default"] for row in rows] == [True, False, False]
    assert rows[0]["clipping"] == "mse" and rows[0]["num_samples"] is None
    assert rows[0]["proxy_s"] == 1.5 and rows[1]["proxy_s"] is None
    assert rows[2]["error"] == "infeasible" and rows[1]["avg_bits"] == 3.0
    assert set(TIMING_KEYS) <= set(rows[0])


def _summary(kept_default: bool) -> dict[str, Any]:
    entry = {"proxy": 0.1, "top1": 0.9, "avg_bits": 3.0, "size_bytes": 1000.0}
    return {
        "study": "s",
        "budgets": ["avg-bits=3", "size-mb=0.001"],
        "user_budgets": ["avg-bits=3"],
        "size_cap_mb": 0.001,
        "proxy": "kl",
        "slices": {
            "proxy": [32, 160],
            "proxy_rungs": [16, 48],
            "curvature_and_correction": [0, 32],
        },
        "trials": {
            "total": 5,
            "complete": 3,
            "pruned": 2,
            "failed": 0,
            "duplicates": 1,
            "distinct_configurations": 4,
        },
        "full_evaluations": 3,
        "eval_data": "eval.npz",
        "best": {**entry, "trial": 3, "params": {"clipping": "minmax"}, "run": {"folder": "b"}},
        "default": {**entry, "trial": 0, "params": {"clipping": "mse"}, "top1": 0.88},
        "best_vs_default": {
            "eval_images": 100,
            "paired_difference": 0.02,
            "paired_difference_stderr": 0.01,
        },
        "selection": {"kept_default": kept_default, "best_top1_trial": 3, "min_gain_se": 1.0},
        "wall_time_split_s": {"hessian_s": 1.0, "proxy_s": 2.0},
        "importances": {"clipping": 1.0},
        "spearman_proxy_vs_top1": 0.5,
    }


def test_report_states_the_choice_and_the_comparison():
    text = report_markdown(_summary(kept_default=False))
    assert "size cap is lcpaq's default configuration's size at avg-bits=3" in text
    assert "| best | 3 | 0.1 | 90.00 | 3.000 | 1000 |" in text
    assert "| default | 0 | 0.1 | 88.00 | 3.000 | 1000 |" in text
    assert "paired on 100 images: +2.00 ± 1.00 points" in text
    assert "- clipping: **minmax**" in text  # differs from the default: bold
    assert "| hessian | 1.0 |" in text and "Spearman(−proxy, top-1)" in text
    assert "the default is kept" not in text
    kept = report_markdown(_summary(kept_default=True))
    assert "Trial 3 had the best top-1" in kept and "the default is kept" in kept
