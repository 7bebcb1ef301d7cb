"""The Optuna study: its RDB storage, creation or resumption, and stale trials.

Input: `SearchOptions` (``--storage``, ``--study-name``, ``--resume``, ``--worker``, the seed
and rungs) and the searched space. Output: an `optuna.Study` (TPE, multivariate, seeded;
successive halving over the proxy rungs) in ``search.db`` unless ``--storage`` names another
database (PostgreSQL for several machines), so several processes can share it and an interrupted
search resumes.
"""

from __future__ import annotations

import json
import os
import socket
import warnings

import optuna
from optuna.trial import TrialState

from lcpaq.errors import InputError
from lcpaq.search.options import SearchOptions
from lcpaq.search.space import SearchSpace

#: Seconds between heartbeats of a running trial, and after which a silent one counts as stale.
HEARTBEAT_S = 10
GRACE_S = 60


def with_driver(url: str) -> str:
    """``postgresql://…`` with the driver lcpaq[postgres] installs (psycopg2): SQLAlchemy 2.1
    picks psycopg 3 for a URL without one. Other URLs are returned as they are."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgresql", "postgres"):
        return f"postgresql+psycopg2://{rest}"
    return url


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage with heartbeats (stale running trials can be detected)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # heartbeat options are flagged experimental
            return optuna.storages.RDBStorage(
                with_driver(url), heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S
            )
    except ImportError:
        hint = " (pip install 'lcpaq[postgres]')" if url.startswith("postgres") else ""
        raise InputError(
            f"cannot open --storage {url!r}: its database driver is not installed{hint}"
        ) from None
    except Exception as error:  # noqa: BLE001 - SQLAlchemy raises many types for bad URLs
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"cannot open --storage {url!r}: {message}") from None


def worker_name() -> str:
    """``host:pid`` of this process, stored on each trial it runs (see `fail_stale_trials`)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process runs no trial yet when it cleans up
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_stale_trials(study: optuna.Study) -> list[int]:
    """Mark trials left RUNNING by a dead process as failed: at once when that process ran on
    this machine (its pid is gone), else when its heartbeat is older than the grace period."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)
    failed = []
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = str(trial.user_attrs.get("worker", ""))
        worker_host, _, pid = worker.rpartition(":")
        if worker_host == host and pid.isdigit() and not _process_alive(int(pid)):
            study.tell(trial.number, state=TrialState.FAIL)
            failed.append(trial.number)
    return failed


def _study_settings(options: SearchOptions, space: SearchSpace) -> dict[str, object]:
    """What a resumed study must agree with (base configuration, space, proxy, slices)."""
    base = options.base.to_dict()
    base["analysis"].pop("allow_unsafe_pickle", None)
    return {
        "base_config": base,
        "space": space.describe(),
        "proxy": options.proxy,
        "rungs": list(options.rungs),
        "fidelity": [options.fidelity, options.cheap_samples],
        "size_cap": options.size_cap,
    }


def open_study(options: SearchOptions, space: SearchSpace) -> tuple[optuna.Study, bool]:
    """Create the study (error if it exists without --resume) or load it (--resume); a
    ``--worker`` creates it or joins it, whichever applies (True: this call created it)."""
    storage = open_storage(options.storage_url)
    sampler = optuna.samplers.TPESampler(
        multivariate=True, seed=options.seed, constant_liar=True, n_startup_trials=10
    )
    pruner: optuna.pruners.BasePruner = (
        optuna.pruners.SuccessiveHalvingPruner(
            min_resource=options.rungs[0],
            reduction_factor=options.rungs[1] // options.rungs[0],
            min_early_stopping_rate=0,
        )
        if len(options.rungs) > 1
        else optuna.pruners.NopPruner()
    )
    names = optuna.study.get_all_study_names(storage)
    settings = json.loads(json.dumps(_study_settings(options, space), default=str))
    if options.worker and options.study_name not in names:
        try:  # the first of several workers started together creates the study
            return _create(options, storage, sampler, pruner, settings), True
        except optuna.exceptions.DuplicatedStudyError:
            names = [options.study_name]  # another worker was first: join its study
    if options.study_name in names:
        if not (options.resume or options.worker):
            raise InputError(
                f"study {options.study_name!r} already exists in {options.storage_url}: pass "
                "--resume to continue it, or choose another --study-name or --out"
            )
        study = optuna.load_study(
            study_name=options.study_name, storage=storage, sampler=sampler, pruner=pruner
        )
        stored = study.user_attrs.get("settings")
        for key, value in settings.items():
            if stored is not None and stored.get(key) != value:
                raise InputError(
                    f"--resume: study {options.study_name!r} was created with a different "
                    f"{key.replace('_', ' ')} ({_short(stored.get(key))} vs {_short(value)})"
                )
        return study, False
    if options.resume:
        raise InputError(
            f"--resume: there is no study {options.study_name!r} in {options.storage_url}"
        )
    return _create(options, storage, sampler, pruner, settings), True


def _create(
    options: SearchOptions,
    storage: optuna.storages.RDBStorage,
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
    settings: dict[str, object],
) -> optuna.Study:
    study = optuna.create_study(
        study_name=options.study_name,
        storage=storage,
        sampler=sampler,
        pruner=pruner,
        direction="minimize",
    )
    study.set_user_attr("settings", settings)
    return study


def _short(value: object) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."
