"""One estimator's running state on disk, so an interrupted analysis continues where it stopped.

An estimator that streams over calibration batches (`lcpaq.sensitivity.gauss_newton`, the
Hutchinson estimators, `lcpaq.sensitivity.activation`, `lcpaq.quant.input_stats`) hands its
`StateFile` a snapshot of everything its result depends on after a finished batch: running sums,
per-sample rows, the position among the batches and the state of its random generator. On a
resumed run it loads the snapshot and goes on from the next batch; because the sums continue in
the same order from the same values, the result is bitwise that of an uninterrupted run.

Snapshots are safetensors files (tensors only, nothing executable) written atomically
(`lcpaq.runfolder.atomic_path`): an interrupt during a write leaves the previous snapshot. Each
carries the analysis' key (`lcpaq.stages.resume`): a file of another analysis is refused.
Writing after every batch can cost more than the batch (a large model's float64 diagonal), so a
snapshot is written when ``every_s`` seconds have passed since the last one and at least four times
the last write's duration (writes then take at most a fifth of the time); ``every_s = 0`` writes
after every batch. The last batch of an estimator is always written, so a later estimator's
interrupt never repeats a finished one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from lcpaq.errors import InputError

#: A snapshot: named tensors (numpy arrays are converted; scalars as 0-d tensors).
Snapshot = Mapping[str, torch.Tensor | np.ndarray]

KEY_METADATA = "lcpaq_analysis_key"


@dataclass
class StateFile:
    """Where one estimator's snapshots go (``path`` None: nowhere, the default of the
    estimators), the analysis key they carry and how often they are written."""

    path: Path | None = None
    key: str = ""
    every_s: float = 10.0
    #: When the last snapshot was written (at first: when this file was opened).
    _last_end_s: float = field(default_factory=time.perf_counter, repr=False)
    _last_cost_s: float = field(default=0.0, repr=False)
    writes: int = field(default=0, repr=False)

    def load(self) -> dict[str, torch.Tensor] | None:
        """The last snapshot (CPU tensors), or None when there is none."""
        if self.path is None or not self.path.is_file():
            return None
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not iterable)
        except (OSError, ValueError, SafetensorError) as error:
            raise InputError(
                f"run folder {self.path.parent.parent}: file {self.path.parent.name}/"
                f"{self.path.name} is damaged ({error}); rerun `lcpaq analyze` without --resume"
            ) from None
        if metadata.get(KEY_METADATA) != self.key:
            raise InputError(
                f"{self.path} belongs to another analysis; rerun `lcpaq analyze` without --resume"
            )
        return tensors

    def due(self) -> bool:
        """Whether a snapshot taken now would be written (`save` without ``last``)."""
        if self.path is None:
            return False
        if self.every_s <= 0:
            return True
        waited = time.perf_counter() - self._last_end_s
        return waited >= max(self.every_s, 4 * self._last_cost_s)

    def save(self, snapshot: Callable[[], Snapshot], *, last: bool = False) -> None:
        """Write ``snapshot()`` when it is `due` (always when ``last``: the estimator's final
        batch). ``snapshot`` is only called when a write happens."""
        if self.path is None or not (last or self.due()):
            return
        from lcpaq.runfolder import atomic_path  # runfolder reads estimates: import at use

        start = time.perf_counter()
        tensors = {name: _cpu_tensor(value) for name, value in snapshot().items()}
        with atomic_path(self.path) as temp:
            save_file(tensors, str(temp), metadata={KEY_METADATA: self.key})
        self._last_end_s = time.perf_counter()
        self._last_cost_s = self._last_end_s - start
        self.writes += 1


def _cpu_tensor(value: torch.Tensor | np.ndarray) -> torch.Tensor:
    tensor = (
        torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
    )
    return tensor.detach().cpu().contiguous()


#: Nothing saved, nothing loaded: the estimators' default.
NO_STATE = StateFile()


def stream_batches(
    add_batch: Callable[[torch.Tensor], None],
    snapshot: Callable[[], Snapshot],
    batches: Sequence[torch.Tensor],
    done: int,
    state_file: StateFile,
    *,
    desc: str,
    progress: bool,
) -> None:
    """Feed ``batches[done:]`` (this process's batches; the first ``done`` came from a resumed
    snapshot) to an estimator's ``add_batch``, offering ``snapshot`` to ``state_file`` after each
    (always after the last), under a progress bar."""
    bar = tqdm(total=len(batches), initial=done, desc=desc, disable=not progress, unit="batch")
    with bar:
        for position, batch in enumerate(batches[done:], start=done + 1):
            add_batch(batch)
            state_file.save(snapshot, last=position == len(batches))
            bar.update()


def generator_state(generator: torch.Generator) -> torch.Tensor:
    """The generator's state as a CPU byte tensor (`torch.Generator.get_state`)."""
    return generator.get_state().clone()


def split_rows(rows: torch.Tensor, counts: torch.Tensor) -> list[np.ndarray]:
    """Per-batch row blocks back from their concatenation and the rows of each batch."""
    sizes = [int(count) for count in counts]
    return [part.numpy() for part in torch.split(rows, sizes)] if sizes else []


def joined_rows(rows: list[np.ndarray], width: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Per-batch row blocks as one array and the rows of each batch (the inverse of `split_rows`);
    ``width``: a block's shape after its first axis, for the empty case."""
    joined = np.concatenate(rows) if rows else np.zeros((0, *width))
    return {"rows": joined, "row_counts": np.array([len(block) for block in rows], np.int64)}
