"""The allocate stage: one format per layer under budgets, proven optimal (METHOD §1–§4).

Input: the candidate table and curvature of analyze (``candidates.npz``, ``curvature.npz``,
optionally ``interactions.npz``) and the budgets. Output: ``frontiers.npz`` and ``allocation.json``
(written by `lcpaq.stages`), which export reads. Numpy, scipy and highspy: importing any module
here never imports torch (tests/allocation/test_torch_free.py).

Modules, in the order data flows through them:

* `table`: the `CandidateTable` [L, C] and candidate names.
* `costs`: cost coefficients per metric (`CostModel`); `frontier`: scores and safe Pareto pruning.
* `budgets`: `Budget` texts, ties; `pairwise`: inter-layer terms and the augmented problem.
* `problem`: `AllocationProblem` (solve, Pareto curve) and the `Allocator` protocol.
* `units` (tied layers merged), `objective` (Σ s + Σ C), `solvers` (which exact method, fallback).
* exact methods: `knapsack` (no pairs, one budget), `exact` (`ChainSolver`, the banded dynamic
  program) with `multipliers`, `labels` and `local_search`, and `highs` (the MIP model).
* `result` (`Allocation`, `ParetoPoint`), `pareto` (the sweep), `diagnose` (why budgets
  conflict), `curves` (model-level curves, baselines and the budget table for the report).
"""
