"""Micro-batches through one model in lockstep: every micro-batch runs its forward pass once, and
each pauses at the same points until all have reached them.

Statistics correction (`lcpaq.model.recovery`) must see the moments of *all* calibration samples at
a BatchNorm before that BatchNorm runs on any of them. Holding the whole calibration batch in one
pass needs its activations at once; re-running a prefix of the model per corrected module is
quadratic in depth. Here each micro-batch runs in its own thread, one thread at a time in
micro-batch order (so the result does not depend on scheduling): a hook calls `Lockstep.meet`,
which parks the micro-batch until the last one arrives; the last one combines the values in
micro-batch order, and every micro-batch continues with that result. Work is one forward pass per
sample (linear in depth); memory is what the paused micro-batches hold at one point of the model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch


class _Aborted(Exception):
    """Ends a micro-batch whose sibling failed."""


class Lockstep:
    """Runs ``forward(index)`` for ``count`` micro-batches in lockstep (see the module docstring).
    Inside a forward, `index` is the running micro-batch and `meet` the synchronisation point."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._condition = threading.Condition()
        self._turn = 0
        self._finished = [False] * count
        self._error: BaseException | None = None
        self._local = threading.local()
        self._key: object = None
        self._values: dict[int, Any] = {}
        self._result: Any = None

    @property
    def index(self) -> int:
        """The micro-batch whose forward pass is running in this thread."""
        return int(self._local.index)

    def meet(self, key: object, value: Any, combine: Callable[[Sequence[Any]], Any]) -> Any:
        """Park this micro-batch at ``key`` with ``value`` until every micro-batch is there; the
        last one calls ``combine`` on the values in micro-batch order. Returns its result."""
        index = self.index
        with self._condition:
            if any(self._finished) or (self._values and key != self._key):
                raise RuntimeError(
                    f"micro-batch {index} reached {key!r} while others "
                    f"{'finished' if any(self._finished) else f'are at {self._key!r}'}: the model "
                    "runs different modules on different inputs"
                )
            self._key = key
            self._values[index] = value
            if index == self.count - 1:
                self._result = combine([self._values[i] for i in range(self.count)])
                self._values, self._key = {}, None
            self._pass_turn(index)
            self._wait_turn(index)
            return self._result

    def run(self, forward: Callable[[int], None]) -> None:
        """``forward(index)`` for every micro-batch, each in its own thread under no_grad."""
        threads = [
            threading.Thread(target=self._work, args=(forward, index), daemon=True)
            for index in range(self.count)
        ]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        except BaseException as error:  # Ctrl-C while waiting: stop the micro-batches too
            self._fail(error)
            for thread in threads:
                thread.join()
            raise
        if self._error is not None:
            raise self._error

    def _work(self, forward: Callable[[int], None], index: int) -> None:
        self._local.index = index
        try:
            with self._condition:
                self._wait_turn(index)
            with torch.no_grad():  # grad mode is per thread
                forward(index)
        except _Aborted:
            return
        except BaseException as error:
            self._fail(error)
            return
        with self._condition:
            if self._values:
                self._fail_locked(
                    RuntimeError(
                        f"micro-batch {index} finished while others wait at {self._key!r}: the "
                        "model runs different modules on different inputs"
                    )
                )
                return
            self._finished[index] = True
            self._pass_turn(index)

    def _pass_turn(self, index: int) -> None:
        """Hand the turn to the next unfinished micro-batch (the lock is held)."""
        for step in range(1, self.count + 1):
            following = (index + step) % self.count
            if not self._finished[following]:
                self._turn = following
                break
        self._condition.notify_all()

    def _wait_turn(self, index: int) -> None:
        self._condition.wait_for(lambda: self._turn == index or self._error is not None)
        if self._error is not None:
            raise _Aborted

    def _fail(self, error: BaseException) -> None:
        with self._condition:
            self._fail_locked(error)

    def _fail_locked(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._condition.notify_all()
