"""An interruptible analysis: its running state in the run folder, and ``--resume``.

While ``analyze`` runs, the folder ``analysis_state/`` of the run folder holds ``key.json`` (the
analysis options and checkpoint hash it measures under) and one snapshot per estimator
(`lcpaq.state_file`: Gauss–Newton traces, the Hutchinson rounds, the activation sensitivity, the
GPTQ input second moments). Every snapshot is written atomically, so Ctrl-C or SIGTERM at any
moment leaves the previous one intact. ``lcpaq analyze --resume`` (and ``run --resume``) with the
same options continues every estimator from its last saved batch: finished estimators are loaded,
the interrupted one goes on, and the result is bitwise that of an uninterrupted run (the sums
continue in the same order, the random generators from the same states). Different options are
refused with a one-line message naming the first difference.

The folder is created before a new analysis touches anything and removed after the last analysis
file is written, so the analysis files of a run folder belong to one finished analysis exactly
when it is absent; later stages refuse a folder that still has it (`check_finished`).

Under torchrun the processes would have to agree on where to resume; the state is not saved there
and ``--resume`` is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lcpaq import runfolder
from lcpaq.config import ResumeSettings, RunConfig
from lcpaq.errors import InputError
from lcpaq.model.zoo import file_sha256
from lcpaq.sensitivity import distributed
from lcpaq.state_file import StateFile

logger = logging.getLogger(__name__)

STATE_DIR = "analysis_state"
KEY_FILE = "key.json"


@dataclass(frozen=True)
class AnalysisState:
    """Where this analysis' estimators save their snapshots (``folder`` None: nowhere)."""

    folder: Path | None = None
    key: str = ""
    every_s: float = 10.0

    def file(self, estimator: str) -> StateFile:
        """The `StateFile` of one estimator (a fresh, inactive one without a folder)."""
        if self.folder is None:
            return StateFile()
        return StateFile(self.folder / f"{estimator}.safetensors", self.key, self.every_s)

    def finish(self) -> None:
        """The analysis files are written: its state is no longer needed."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


#: No state saved (in-memory analyses, torchrun).
NO_ANALYSIS_STATE = AnalysisState()


def analysis_key(config: RunConfig) -> dict[str, Any]:
    """What an analysis' result depends on: its options and the checkpoint's bytes."""
    checkpoint = config.analysis.checkpoint
    path = Path(checkpoint) if checkpoint else None
    return {
        "analysis": json.loads(json.dumps(asdict(config.analysis), default=str)),
        "checkpoint_sha256": file_sha256(path) if path is not None and path.is_file() else None,
    }


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """``option: old → new`` for every analysis option (and the checkpoint) that differs."""
    old, new = stored.get("analysis", {}), wanted["analysis"]
    changed = [
        f"{name}: {old.get(name)!r} → {new.get(name)!r}"
        for name in sorted(set(old) | set(new))
        if old.get(name) != new.get(name)
    ]
    if stored.get("checkpoint_sha256") != wanted["checkpoint_sha256"]:
        changed.append("the checkpoint file's contents")
    return changed


def saves_state(settings: ResumeSettings) -> bool:
    """Whether this process saves the analysis' state: not under torchrun, where ``--resume``
    is refused (in every process, so none waits for the others)."""
    if distributed.rank_and_world()[1] == 1:
        return True
    if settings.resume:
        raise InputError("--resume is not available under torchrun; run analyze without it")
    return False


def open_state(run_dir: Path, config: RunConfig, settings: ResumeSettings) -> AnalysisState:
    """The state of the analysis about to run in ``run_dir``: the interrupted one's with
    ``--resume`` (its options must be ``config``'s), else a new, empty one."""
    if not saves_state(settings):
        return NO_ANALYSIS_STATE
    folder = run_dir / STATE_DIR
    key = analysis_key(config)
    if settings.resume and (folder / KEY_FILE).is_file():
        stored = runfolder.read_json(folder / KEY_FILE, "analysis state")
        changed = _differences(stored, key)
        if changed:
            raise InputError(
                f"--resume: the interrupted analysis in {run_dir} used other options "
                f"({'; '.join(changed)}); give the same options, or rerun without --resume"
            )
        logger.info("resuming the interrupted analysis in %s", run_dir)
        return AnalysisState(folder, _digest(key), settings.every_s)
    if settings.resume:
        logger.info("--resume: no interrupted analysis in %s; analysing from the start", run_dir)
    shutil.rmtree(folder, ignore_errors=True)
    runfolder.write_json(folder / KEY_FILE, key)
    return AnalysisState(folder, _digest(key), settings.every_s)


def finished_analysis(run_dir: Path, config: RunConfig) -> bool:
    """Whether ``run_dir`` holds a finished analysis under ``config``'s analysis options (what
    ``run --resume`` after an interrupt in a later stage need not repeat)."""
    if (run_dir / STATE_DIR).exists() or not (run_dir / "candidates.npz").is_file():
        return False
    path = run_dir / "run_config.json"
    if not path.is_file():
        return False
    try:
        stored = RunConfig.from_dict(runfolder.read_json(path, "run configuration"))
    except InputError:
        return False
    return stored.analysis == config.analysis


def check_finished(run_dir: Path) -> None:
    """Refuse a run folder whose analysis was interrupted (its files are not one analysis')."""
    if (run_dir / STATE_DIR).is_dir():
        raise InputError(
            f"run folder {run_dir}: its analysis was interrupted; continue it with "
            "`lcpaq analyze --resume` (same options) or rerun `lcpaq analyze`"
        )
