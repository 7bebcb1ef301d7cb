"""Running the study: one process's trials, each a configuration through the stages.

Input: `SearchOptions`. Output: trials in the Optuna study (proxy values per rung, allocation
figures and timings as user attributes); `run_search` then hands over to
`lcpaq.search.final.finish` (full evaluation of the top-k, ``best/``, the report). Every trial
keeps the same hard budgets, plus (unless a size budget was given) the size of lcpaq's default
configuration, so proxy scores compare like for like.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import numpy as np
import optuna
from optuna.trial import TrialState

from lcpaq.allocation.budgets import Budget, parse_budget
from lcpaq.config import RunConfig
from lcpaq.search.context import Infeasible, SearchContext
from lcpaq.search.fidelity import cheap_config, cheap_rung
from lcpaq.search.final import finish
from lcpaq.search.keys import model_key
from lcpaq.search.options import SearchOptions
from lcpaq.search.space import SearchSpace, search_space
from lcpaq.search.start import find_start
from lcpaq.search.study import fail_stale_trials, open_study, worker_name
from lcpaq.stages import pipeline

logger = logging.getLogger(__name__)

#: Study attribute set once the creator has its starting point and reference trial in place.
READY_ATTR = "ready"
#: Seconds a joining worker waits for the creator's setup (curvature of the starting point).
JOIN_PATIENCE_S = 3600.0


def ceil_budget_mb(size_bytes: float) -> float:
    """A size-mb limit ≥ ``size_bytes`` that survives `Budget`'s 6-significant-digit text."""
    value = math.ceil(size_bytes) / 1e6
    text_value = float(f"{value:g}")
    while text_value < value:
        value = value * (1 + 1e-6)
        text_value = float(f"{value:g}")
    return text_value


def has_size_budget(budgets: Sequence[str]) -> bool:
    return any(parse_budget(text).metric in ("size-mb", "size-frac") for text in budgets)


class Search:
    """One process's part of a search: trials, then the final step."""

    def __init__(
        self,
        options: SearchOptions,
        space: SearchSpace,
        context: SearchContext,
        study: optuna.Study,
        created: bool,
        *,
        started: tuple[float, float],
        progress: bool = True,
    ) -> None:
        """``started``: (wall, CPU) clock when the process's setup began; ``created``: the
        study is new (its first trial is lcpaq's default configuration)."""
        self.options, self.space, self.context = options, space, context
        self.study, self.created = study, created
        self.base = options.base
        self.progress = progress
        self.wall_start, self.cpu_start = started
        self.process_timings: dict[str, float] = {"setup_s": time.perf_counter() - self.wall_start}
        self._trial_base: RunConfig | None = None
        self._start_logged = False

    @classmethod
    def start(cls, options: SearchOptions, *, progress: bool = True) -> Search:
        """Check the output folder, load the model and data, open (or resume) the study."""
        pipeline.ensure_writable(options.out)
        started = (time.perf_counter(), time.process_time())
        space = search_space(options)
        context = SearchContext.open(options.base, options.out, space, options.proxy, options.rungs)
        study, created = open_study(options, space)
        return cls(options, space, context, study, created, started=started, progress=progress)

    # -- budgets ---------------------------------------------------------------------------
    def starting_point(self) -> dict[str, Any] | None:
        """Trial 0's parameters (`lcpaq.search.start`), found once per study and stored in it;
        the space's defaults become them, so the final step compares against them. None when
        no configuration near lcpaq's default fits the budgets."""
        stored = self.study.user_attrs.get("start")
        if stored is None:
            start = find_start(self.space, self.base, self.context)
            self.process_timings["hessian_s"] = start.seconds
            stored = start.to_attrs()
            self.study.set_user_attr("start", stored)
        if stored["note"] and not self._start_logged:
            logger.warning("search: %s", stored["note"])
            self._start_logged = True
        params = stored["params"]
        if params is not None:
            for name, value in params.items():
                if value != self.space.dimension(name).default:
                    self.space = self.space.with_default(name, value)
        return params

    def with_size_cap(self) -> RunConfig:
        """The base configuration with the size cap of this study (METHOD §5: fixed budgets).

        ``avg-bits`` counts code bits only; finer scale groups and zero points then come for
        free. Unless the user gave a size budget, every trial is also held to the size (codes,
        scales, zero points) of the starting configuration (lcpaq's default when it fits) at
        the same budgets; without a starting configuration there is no cap.
        """
        params = self.starting_point()
        if not self.options.size_cap or has_size_budget(self.base.allocation.budgets):
            return self.base
        if params is None:
            return self.base
        if "size_cap_mb" not in self.study.user_attrs:
            start = self.context.prepare(self.space.config(self.base, params), build=False)
            self.study.set_user_attr("size_cap_mb", ceil_budget_mb(start.allocation.size_bytes))
        cap = Budget("size-mb", float(self.study.user_attrs["size_cap_mb"]))
        return self.base.with_allocation(budgets=(*self.base.allocation.budgets, str(cap)))

    def trial_base(self) -> RunConfig:
        """`with_size_cap`, computed once: the base every trial's configuration varies."""
        if self._trial_base is None:
            self._trial_base = self.with_size_cap()
        return self._trial_base

    # -- trials ----------------------------------------------------------------------------
    def run_trials(self) -> None:
        options = self.options
        if not self.created:
            self._wait_for_creator()
        self.trial_base()  # the starting point and size cap, before the first trial
        start = self.starting_point()
        if not self.created:
            stale = fail_stale_trials(self.study)
            if stale:
                logger.info("marked stale running trial(s) %s as failed", stale)
        if READY_ATTR not in self.study.user_attrs:
            # The creator (this process, or one that died before its setup ended) enqueues
            # the reference trial once, before any sampled trial.
            has_default = any(t.user_attrs.get("default") for t in self.study.trials)
            if start is not None and not has_default:
                self.study.enqueue_trial(start, user_attrs={"default": True})
            self.study.set_user_attr(READY_ATTR, True)
        finished = self._count_finished()
        wanted = min(options.trials, self.space.size)
        remaining = wanted - finished
        if remaining <= 0:
            logger.info("study already has %d scored configurations", finished)
            return
        logger.info(
            "search: %d configuration(s) to score (%d done), proxy %s on images %s of %s",
            remaining,
            finished,
            options.proxy,
            self.context.slices.to_dict()["proxy"],
            self.base.analysis.calib,
        )

        def stop_when_done(study: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
            if self._count_finished() >= wanted:
                study.stop()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.study.optimize(
                self._objective,
                # Repeats of a scored configuration cost nothing and do not count; this bounds
                # how many TPE may propose once it converges.
                n_trials=3 * remaining + 10,
                callbacks=[stop_when_done],
                gc_after_trial=False,
            )

    def _wait_for_creator(self) -> None:
        """A worker that joined a study waits until its creator has found the starting point
        and enqueued the reference trial, so trial 0 is lcpaq's default in every study; after
        `JOIN_PATIENCE_S` (the creator died during its setup) it does the setup itself."""
        deadline = time.monotonic() + JOIN_PATIENCE_S
        logged = False
        while READY_ATTR not in self.study.user_attrs and not self.options.resume:
            if time.monotonic() > deadline:
                logger.warning("search: the study's creator never finished its setup; doing it")
                return
            if not logged:
                logger.info("search: waiting for the worker that created the study")
                logged = True
            time.sleep(0.5)

    def trial_states(self) -> dict[str, int]:
        """How many trials of the study are in each state (a worker's summary)."""
        states = [trial.state.name for trial in self.study.get_trials(deepcopy=False)]
        return {name: states.count(name) for name in sorted(set(states))}

    def _count_finished(self) -> int:
        """Scored configurations: complete or pruned trials that are not repeats."""
        states = (TrialState.COMPLETE, TrialState.PRUNED)
        trials = self.study.get_trials(deepcopy=False, states=states)
        return sum("duplicate_of" not in trial.user_attrs for trial in trials)

    def _duplicate(self, params: Mapping[str, Any], number: int) -> optuna.trial.FrozenTrial | None:
        states = (TrialState.COMPLETE, TrialState.PRUNED)
        for other in self.study.get_trials(deepcopy=False, states=states):
            if (
                other.number != number
                and other.params == dict(params)
                and "duplicate_of" not in other.user_attrs
            ):
                return other
        return None

    def _objective(self, trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", worker_name())
        params = self.space.suggest(trial)
        duplicate = self._duplicate(params, trial.number)
        if duplicate is not None:
            logger.info("trial %d: same configuration as trial %d", trial.number, duplicate.number)
            return self._replay(trial, duplicate)
        config = self.space.config(self.trial_base(), params)
        first_full = self._cheap_first_rung(trial, config)  # index of the first full-fidelity rung
        try:
            prepared = self.context.prepare(config, build=False)
        except Infeasible as error:
            self._infeasible(trial, error)
        trial.set_user_attr("full_fidelity", True)
        timings = prepared.timings
        allocation = prepared.allocation
        trial.set_user_attr("avg_bits", allocation.average_bits)
        trial.set_user_attr("size_bytes", allocation.size_bytes)
        trial.set_user_attr("predicted_loss_increase", allocation.predicted_loss_increase)
        trial.set_user_attr("assignment", list(allocation.formats))
        key = model_key(config, allocation)
        trial.set_user_attr("model_key", key)
        known, source = self._known_sums(key, trial.number)
        if known:
            logger.info("trial %d: same quantized model as trial %d", trial.number, source)
            trial.set_user_attr("same_model_as", source)
        scorer, sums, done = self.context.scorer, np.zeros(2), 0
        proxy_s = 0.0
        recorded: dict[str, list[float]] = {}
        try:
            for index, rung in enumerate(self.options.rungs):
                if rung in known:
                    sums = np.array(known[rung])
                else:
                    quantized = self.context.build(prepared)
                    start = time.perf_counter()
                    sums = sums + scorer.sums(quantized, done, rung)
                    proxy_s += time.perf_counter() - start
                done = rung
                value = scorer.value(sums, done)
                recorded[str(rung)] = [float(x) for x in sums]
                trial.set_user_attr("proxy_sums", recorded)
                if index < first_full:  # the cheap rung reported this step
                    trial.set_user_attr("full_first_rung", value)
                    continue
                trial.report(value, rung)
                if index < len(self.options.rungs) - 1 and trial.should_prune():
                    logger.info(
                        "trial %d: %s %.5g on %d images, pruned",
                        trial.number,
                        scorer.kind,
                        value,
                        rung,
                    )
                    raise optuna.TrialPruned()
        finally:
            timings["proxy_s"] = proxy_s
            for name, seconds in timings.items():
                trial.set_user_attr(name, seconds)
        logger.info(
            "trial %d: %s %.5g on %d images, %.3f bits, %.1f s",
            trial.number,
            scorer.kind,
            value,
            done,
            allocation.average_bits,
            sum(timings.values()),
        )
        return value

    def _infeasible(self, trial: optuna.Trial, error: Infeasible) -> NoReturn:
        """Pruned before the first slice: it counts as a trial (it cost an ILP solve) and TPE
        ranks pruned trials without intermediate values last, so it learns to avoid them."""
        trial.set_user_attr("error", str(error))
        for name, seconds in error.timings.items():
            trial.set_user_attr(name, seconds)
        logger.info("trial %d: infeasible, pruned (%s)", trial.number, error)
        raise optuna.TrialPruned() from None

    def _cheap_first_rung(self, trial: optuna.Trial, config: RunConfig) -> int:
        """With ``--fidelity multi``, the first rung on the cheap configuration
        (`lcpaq.search.fidelity`), pruned as any rung; returns the index of the first rung
        measured at full fidelity (0 when the cheap configuration is the configuration)."""
        rungs = self.options.rungs
        cheap = cheap_config(config, self.options.cheap_samples)
        if self.options.fidelity != "multi" or len(rungs) < 2 or cheap == config:
            return 0
        try:
            value = cheap_rung(self.context, trial, cheap, rungs[0])
        except Infeasible as error:
            self._infeasible(trial, error)
        trial.report(value, rungs[0])
        if trial.should_prune():
            kind = self.context.scorer.kind
            logger.info(
                "trial %d: %s %.5g on %d images (cheap rung), pruned",
                trial.number,
                kind,
                value,
                rungs[0],
            )
            raise optuna.TrialPruned()
        return 1

    def _known_sums(self, key: str, number: int) -> tuple[dict[int, list[float]], int | None]:
        """Proxy sums per slice already measured for this quantized model by another trial."""
        best: dict[int, list[float]] = {}
        source = None
        for other in self.study.get_trials(deepcopy=False):
            if other.number == number or other.user_attrs.get("model_key") != key:
                continue
            sums = {
                int(rung): value for rung, value in other.user_attrs.get("proxy_sums", {}).items()
            }
            if len(sums) > len(best):
                best, source = sums, other.number
        return best, source

    def _replay(self, trial: optuna.Trial, other: optuna.trial.FrozenTrial) -> float:
        """A configuration already scored: report its values again instead of recomputing."""
        trial.set_user_attr("duplicate_of", other.number)
        names = ("avg_bits", "size_bytes", "predicted_loss_increase", "assignment", "error")
        for name in (*names, "model_key", "proxy_sums"):
            if name in other.user_attrs:
                trial.set_user_attr(name, other.user_attrs[name])
        for step, value in sorted(other.intermediate_values.items()):
            trial.report(value, step)
        if other.state == TrialState.PRUNED:
            raise optuna.TrialPruned()
        assert other.value is not None
        return other.value


def run_search(options: SearchOptions, *, progress: bool = True) -> dict[str, object]:
    """``lcpaq search``: run (or resume) the study, then the final step."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # lcpaq logs each trial itself
    try:
        search = Search.start(options, progress=progress)
        search.run_trials()
        if options.worker:  # the final step is the --resume's, over every worker's trials
            return {"worker": worker_name(), "trials": search.trial_states()}
        return finish(search)
    finally:
        optuna.logging.set_verbosity(verbosity)
