"""Config dataclasses and the command line generated from their option declarations: every field
has one flag whose default is the field's, flags parse back into the same configuration, the file
round-trips, and bad values are one-line InputErrors."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from lcpaq import runfolder
from lcpaq.cli import build_parser, main
from lcpaq.config import (
    DEFAULT_SCHEME,
    AllocationConfig,
    AnalysisConfig,
    RecoveryConfig,
    ResumeSettings,
    RunConfig,
    SearchSettings,
    SweepSettings,
)
from lcpaq.config.analysis import SCHEME_OPTIONS
from lcpaq.config.options import build, declared_options
from lcpaq.config.text import TEXT_OPTIONS, TextOptions
from lcpaq.errors import InputError
from lcpaq.quant.formats import QuantScheme

#: Fields that are deliberately not on the command line (run_config.json or code sets them).
NOT_ON_THE_COMMAND_LINE = {
    (AllocationConfig, "cost_weights"),
    (AnalysisConfig, "scheme"),  # its fields are: SCHEME_OPTIONS
    (AnalysisConfig, "text"),  # its fields are: TEXT_OPTIONS
    (QuantScheme, "mse_grid_points"),
}
CONFIGS = (AnalysisConfig, RecoveryConfig, AllocationConfig, SweepSettings, SearchSettings)
#: Flags of analyze/run that no search has (``--resume`` there continues a study instead).
RUN_ONLY = (ResumeSettings,)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


@pytest.mark.parametrize("cls", [*CONFIGS, *RUN_ONLY, QuantScheme, TextOptions])
def test_every_field_has_exactly_one_flag(cls):
    if cls is QuantScheme:
        declared = {name: option.flag for name, option in SCHEME_OPTIONS.items()}
    elif cls is TextOptions:
        declared = {name: option.flag for name, option in TEXT_OPTIONS.items()}
    else:
        declared = {d.field: d.option.flag for d in declared_options(cls) if d.outer is None}
    fields = {f.name for f in dataclasses.fields(cls)} - {
        name for owner, name in NOT_ON_THE_COMMAND_LINE if owner is cls
    }
    assert set(declared) == fields
    for configs in (CONFIGS, (*CONFIGS[:-1], *RUN_ONLY)):  # the flags of one subcommand
        all_flags = [d.option.flag for config in configs for d in declared_options(config)]
        assert len(all_flags) == len(set(all_flags)), "a flag is declared twice"


def test_flag_defaults_are_the_field_defaults():
    """Each subcommand's flags default to the declaring field's default (QuantScheme's:
    DEFAULT_SCHEME's, GPTQ rounding)."""
    run_flags = {
        d.option.flag: d for config in (*CONFIGS[:-1], *RUN_ONLY) for d in declared_options(config)
    }
    search_flags = {d.option.flag: d for d in declared_options(SearchSettings)}
    for name, parser in _subparsers(build_parser()).items():
        declared = {**run_flags, **search_flags} if name == "search" else run_flags
        flags = _flags(parser)
        for flag, action in flags.items():
            if flag in declared:
                assert action.default == declared[flag].flag_default, (name, flag)
        # Generated: every option of these subcommands is a declared one.
        if name in ("analyze", "allocate", "search"):
            assert set(flags) - {"-h", "--help", "--out"} <= set(declared), name
    analyze = _flags(_subparsers(build_parser())["analyze"])
    assert analyze["--rounding"].default == DEFAULT_SCHEME.rounding == "gptq"
    assert analyze["--formats"].default == "int2,int3,int4,int5,int6,int8"


def test_defaults_parse_back_into_the_default_configuration():
    parser = build_parser()
    args = parser.parse_args(["analyze", "--model", "m", "--calib", "c", "--out", "o"])
    assert build(AnalysisConfig, args) == AnalysisConfig(model="m", checkpoint=None, calib="c")
    assert build(RecoveryConfig, args) == RecoveryConfig()
    assert build(AllocationConfig, args) == AllocationConfig()  # analyze has no allocation flags
    args = parser.parse_args(["allocate", "r", "--budget", "avg-bits=3"])
    assert build(AllocationConfig, args) == AllocationConfig(budgets=("avg-bits=3",))
    args = parser.parse_args(["sweep", "r"])
    assert build(SweepSettings, args) == SweepSettings()


def test_flags_parse_into_their_fields():
    args = build_parser().parse_args(
        [
            "run",
            "--model=m",
            "--calib=c",
            "--out=o",
            "--formats=int8,int4",
            "--act-formats=int8,fp8_e4m3",
            "--symmetric",
            "--rounding=nearest",
            "--no-correction",
            "--budget=avg-bits=2.50",
            "--tie=a,b",
            "--pair-z=0.5",
        ]
    )
    analysis = build(AnalysisConfig, args)
    assert analysis.formats == ("int4", "int8")
    assert analysis.act_formats == ("fp8_e4m3", "int8")
    assert analysis.scheme == QuantScheme(symmetric=True, rounding="nearest")
    assert build(RecoveryConfig, args) == RecoveryConfig(enabled=False)
    allocation = build(AllocationConfig, args)
    assert allocation.budgets == ("avg-bits=2.5",)
    assert allocation.ties == (("a", "b"),)
    assert allocation.pair_z == 0.5


def test_search_settings_defaults_are_search_options_defaults():
    from lcpaq.search import DEFAULT_RUNGS, SearchOptions
    from lcpaq.search.proxy import PROXIES

    expected = {f.name: f.default for f in dataclasses.fields(SearchOptions)}
    settings = {f.name: f.default for f in dataclasses.fields(SearchSettings)}
    for name in ("trials", "top_k", "min_gain_se", "proxy", "study_name", "resume"):
        assert settings[name] == expected[name], name
    assert settings["size_cap"] == ("default" if expected["size_cap"] else "none")
    assert (
        settings["proxy_samples"]
        == ",".join(map(str, DEFAULT_RUNGS))
        == ",".join(map(str, expected["rungs"]))
    )
    assert _flags(_subparsers(build_parser())["search"])["--proxy"].choices == list(PROXIES)


def test_run_config_round_trips_with_an_unchanged_layout():
    config = RunConfig(
        analysis=AnalysisConfig(
            model="m",
            checkpoint="k",
            calib="c",
            act_formats=("int8",),
            scheme=QuantScheme(granularity="group", group_size=64),
            pairwise="forward",
            text=TextOptions(task="causal-lm", seq_len=64),
        ),
        recovery=RecoveryConfig(enabled=False, num_samples=7),
        allocation=AllocationConfig(
            budgets=("avg-bits=3.0",), ties=(("a", "b"),), cost_weights=(("bitops-g", 0.5),)
        ),
    )
    data = config.to_dict()
    assert RunConfig.from_dict(data) == config
    # The run_config.json layout (key order included) of the configuration version 2 files.
    assert list(data) == ["config_version", "analysis", "recovery", "allocation"]
    assert list(data["analysis"]) == [
        "model", "checkpoint", "calib", "normalize", "image_size", "num_samples", "batch_size",
        "loss", "formats", "act_formats", "act_clipping", "scheme", "hutchinson_probes",
        "hutchinson_samples", "estimator", "hutchinson_rel_tol", "pyhessian_iters", "seed",
        "allow_unsafe_pickle", "pairwise", "pair_rule", "pair_window", "pair_samples",
        "pair_loss", "pair_max_bits", "limpq_steps", "include", "exclude", "text",
    ]  # fmt: skip
    assert list(data["analysis"]["text"]) == ["task", "seq_len", "trust_remote_code"]
    assert list(data["recovery"]) == ["enabled", "num_samples", "learn_scales"]
    assert list(data["allocation"]) == [
        "budgets", "first_last", "scorer", "ties", "tie_rule", "latency_table", "cost_weights",
        "pairwise_weight", "pair_z", "pair_clip", "pairwise_mode",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--formats", "int9"], "unknown number format 'int9'"),
        (["--act-formats", "bogus"], "unknown activation format 'bogus'"),
        (["--group-size", "7"], "group size must be one of 32, 64, 128, got 7"),
        (["--num-samples", "0"], "num-samples must be at least 1, got 0"),
        (["--hutchinson-probes", "1"], "hutchinson-probes must be 0 (off) or at least 2"),
        (["--budget", "avg-bits=-1"], "the value must be a positive number"),
        (["--tie", "a"], "give at least two layer names"),
        (["--pair-z", "nan"], "pair-z must be a finite number >= 0, got nan"),
    ],
)
def test_invalid_values_are_input_errors(argv, needle):
    args = build_parser().parse_args(["run", "--model=m", "--calib=c", "--out=o", *argv])
    with pytest.raises(InputError) as error:
        RunConfig(
            analysis=build(AnalysisConfig, args),
            recovery=build(RecoveryConfig, args),
            allocation=build(AllocationConfig, args),
        )
    assert needle in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("data", [{}, {"analysis": {"model": "m"}}, {"analysis": 3}])
def test_malformed_configuration_is_an_input_error(data):
    with pytest.raises(InputError, match="cfg is malformed"):
        RunConfig.from_dict(data, source="cfg")


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--num-samples", "8"], "--num-samples"),
        (["--granularity", "tensor", "--no-correction"], "--granularity, --no-correction"),
        (["--pair-z", "1", "--tie", "a,b"], "--tie, --pair-z"),
    ],
)
def test_config_file_refuses_the_options_it_holds(tmp_path, capsys, flags, named):
    path = runfolder.write_json(
        tmp_path / "c.json",
        RunConfig(analysis=AnalysisConfig(model="m", checkpoint=None, calib="c")).to_dict(),
    )
    code = main(["run", "--config", str(path), "--out", str(tmp_path / "o"), *flags])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        f"lcpaq: error: {named} cannot be combined with --config {path}: "
        "edit the configuration file instead"
    )


def test_text_flags_parse_into_analysis_text(tmp_path):
    args = build_parser().parse_args(
        ["analyze", "--model", "hf:m", "--calib", "c", "--out", "o", "--task", "causal-lm",
         "--seq-len", "256", "--trust-remote-code"]
    )  # fmt: skip
    analysis = build(AnalysisConfig, args)
    assert analysis.text == TextOptions(task="causal-lm", seq_len=256, trust_remote_code=True)
    assert analysis.loss == "auto"
    with pytest.raises(InputError, match="seq-len must be at least 2 tokens, got 1"):
        TextOptions(seq_len=1)
    # Older run_config.json files have no text block; --trust-remote-code amends a --config file.
    data = RunConfig(analysis=AnalysisConfig(model="hf:m", checkpoint=None, calib="c")).to_dict()
    del data["analysis"]["text"]
    assert RunConfig.from_dict(data).analysis.text == TextOptions()
    path = tmp_path / "run_config.json"
    runfolder.write_json(path, data)
    args = build_parser().parse_args(
        ["run", "--config", str(path), "--trust-remote-code", "--out", "o"]
    )
    from lcpaq.cli import _config_from_file

    assert _config_from_file(args).analysis.text.trust_remote_code
