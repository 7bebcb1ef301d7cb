"""Run configuration: one frozen dataclass per stage, stored in the run folder as ``run_config.json``
so later stages (and re-runs) read the same model, data and options the analysis used.

Every command-line option is declared once, on the field it sets: name, type and default on the
field, flag, help and parsing in its metadata (`lcpaq.config.options`); `lcpaq.cli` generates the
CLI from them and builds the configs back from the parsed flags.

- `analysis`: `AnalysisConfig` (and the `QuantScheme` flags), read by the analyze stage;
- `allocation`: `AllocationConfig`, the options of the allocate stage (and of the sweep's solves);
- `run`: `RunConfig` (the file: analysis, recovery, allocation) and `RecoveryConfig`;
- `flags`: the sweep's, the analysis' resume, the export's and the search's flags, which are no
  part of a run configuration.
"""

from lcpaq.config.allocation import AllocationConfig, FirstLastPolicy
from lcpaq.config.analysis import DEFAULT_FORMATS, DEFAULT_SCHEME, AnalysisConfig
from lcpaq.config.flags import ExportSettings, ResumeSettings, SearchSettings, SweepSettings
from lcpaq.config.run import CONFIG_VERSION, RecoveryConfig, RunConfig

__all__ = [
    "CONFIG_VERSION",
    "DEFAULT_FORMATS",
    "DEFAULT_SCHEME",
    "ExportSettings",
    "AllocationConfig",
    "AnalysisConfig",
    "FirstLastPolicy",
    "RecoveryConfig",
    "ResumeSettings",
    "RunConfig",
    "SearchSettings",
    "SweepSettings",
]
