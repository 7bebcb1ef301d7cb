"""Multi-fidelity trials (`lcpaq.search.fidelity`): the cheap configuration, the per-rung cost and
rank agreement, and a ``--fidelity multi`` search whose cheap rungs share one curvature pass."""

from __future__ import annotations

import json
from dataclasses import replace

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial
from search_helpers import digits_config, make_files, search_args, study_of

from lcpaq.cli import main
from lcpaq.config import RecoveryConfig
from lcpaq.search.fidelity import agreement, cheap_config


def test_cheap_config_caps_curvature_and_correction_samples(tmp_path):
    config = digits_config(make_files(tmp_path), num_samples=256)
    config = replace(config, recovery=RecoveryConfig(enabled=True, num_samples=512))
    cheap = cheap_config(config, 128)
    assert cheap.analysis.num_samples == 128 and cheap.recovery.num_samples == 128
    assert replace(cheap.analysis, num_samples=256) == config.analysis  # nothing else changes
    assert cheap_config(config, 1024) == config
    off = replace(config, recovery=RecoveryConfig(enabled=False))
    assert cheap_config(off, 128).recovery == off.recovery


def _trial(number: int, cheap: float | None, full_first: float | None, value: float | None):
    attrs: dict[str, object] = {"cheap_ilp_s": 1.0, "cheap_proxy_s": 0.5}
    if cheap is not None:
        attrs["cheap_proxy"] = cheap
    if full_first is not None:
        attrs.update(full_first_rung=full_first, full_fidelity=True, ilp_s=2.0, proxy_s=4.0)
    trial = create_trial(
        params={"x": number},
        distributions={"x": CategoricalDistribution(list(range(10)))},
        value=value,
        state=TrialState.COMPLETE if value is not None else TrialState.PRUNED,
        user_attrs=attrs,
    )
    trial.number = number
    return trial


def test_agreement_counts_costs_and_ranks():
    trials = [
        _trial(0, 0.1, 0.05, 0.04),
        _trial(1, 0.2, 0.10, 0.12),
        _trial(2, 0.3, 0.20, 0.08),
        _trial(3, 0.9, None, None),  # pruned at the cheap rung
    ]
    result = agreement(trials)
    assert result["cheap_rung_trials"] == 4 and result["full_fidelity_trials"] == 3
    assert result["cheap_rung_s"] == pytest.approx(4 * 1.5)
    assert result["full_fidelity_s"] == pytest.approx(3 * 6.0)
    assert result["compared_trials"] == 3
    assert result["spearman_cheap_vs_full_first_rung"] == pytest.approx(1.0)
    assert result["spearman_cheap_vs_full_last_rung"] == pytest.approx(0.5)


def test_multi_fidelity_search(tmp_path, single_thread, monkeypatch):
    from lcpaq.stages import pipeline

    monkeypatch.setattr(pipeline, "plot", lambda run_dir: [])
    files = make_files(tmp_path)
    out = tmp_path / "s"
    extra = ("--fidelity", "multi", "--cheap-samples", "16")
    assert main(search_args(files, out, *extra, trials=4)) == 0
    trials = [t for t in study_of(out).trials if "duplicate_of" not in t.user_attrs]
    for trial in trials:
        first = min(trial.intermediate_values)
        assert trial.intermediate_values[first] == trial.user_attrs["cheap_proxy"]
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert trial.user_attrs["full_fidelity"] is True
            assert "full_first_rung" in trial.user_attrs
    # the cheap rung of every trial shares one curvature pass at 16 images
    assert len(list((out / "cache").glob("curvature-n16-*"))) == 1
    report = json.loads((out / "search_report.json").read_text())
    fidelity = report["fidelity"]
    assert fidelity["mode"] == "multi" and fidelity["cheap_rung_trials"] == len(trials)
    assert fidelity["full_fidelity_trials"] >= 1 and fidelity["cheap_rung_s"] > 0
