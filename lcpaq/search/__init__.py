"""Low-cost proxy search over the pipeline's own options at fixed budgets (METHOD §5), on Optuna.

A *configuration* is a `RunConfig`: the search varies documented, typed options of the pipeline
(`SearchSpace`, docs/05-search.md), never search-only knobs, and every configuration keeps the
same hard budgets, so proxy scores compare like for like. One trial (`lcpaq.search.runner`):

- curvature for its (calibration samples, loss, seed, estimator options): computed once per
  distinct key by the ordinary ``analyze`` stage into ``cache/curvature-…/`` and reloaded after
  (`lcpaq.search.cache`, keys in `lcpaq.search.keys`);
- candidate table from cached quantized weights (``cache/weights/<scheme>/<format>.safetensors``,
  pure weight arithmetic, once per (scheme, format));
- the ``allocate`` stage's solve (HiGHS) over that cached analysis in memory
  (`lcpaq.stages.allocate.ProblemData`, `lcpaq.search.context`): a trial writes no run folder,
  its per-layer formats stay in the study (the trial's ``assignment`` attribute);
- the quantized model from the cached weights, statistics correction as ``export`` does it;
- the proxy (`lcpaq.search.proxy`) on a held-out calibration slice disjoint from the curvature
  and correction images (the file's tail, `lcpaq.search.slices`): mean KL(p_FP ‖ p_Q) by
  default, on growing slices (128 → 384 → 1152 images) with Optuna's successive-halving pruner
  between them.

The study (`lcpaq.search.study`: TPE, multivariate, seeded; lcpaq's default configuration
enqueued first) lives in an Optuna RDB storage, ``search.db`` (SQLite) in the run folder unless
``--storage`` names another, so several processes can share it and an interrupted search
resumes. At the end (`lcpaq.search.final`) only the top-k configurations by proxy (and the
default) get a full evaluation; the best is written as ``best_config.json`` and run through the
ordinary stages into ``best/``; `lcpaq.search.summary` and `lcpaq.search.plots` write the report.

This package's public API: `SearchOptions` and `run_search` (what ``lcpaq search`` calls), the
option parsers `parse_fix` and `parse_rungs`, `search_space` (the space a search samples), and,
for step-by-step use (scripts/bench_search.py), `SearchSpace`, `SearchContext`, `Infeasible` and
`DEFAULT_RUNGS`.
"""

from lcpaq.search.context import Infeasible, SearchContext
from lcpaq.search.options import DEFAULT_RUNGS, SearchOptions
from lcpaq.search.runner import run_search
from lcpaq.search.slices import parse_rungs
from lcpaq.search.space import SearchSpace, parse_fix, search_space

__all__ = [
    "DEFAULT_RUNGS",
    "Infeasible",
    "SearchContext",
    "SearchOptions",
    "SearchSpace",
    "parse_fix",
    "parse_rungs",
    "run_search",
    "search_space",
]
