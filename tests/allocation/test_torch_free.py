"""`lcpaq.allocation` imports without torch: every module of the package, in a fresh interpreter
where ``import torch`` fails (the allocation stage runs where torch is not installed)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import lcpaq.allocation

MODULES = sorted(
    f"lcpaq.allocation.{info.name}" for info in pkgutil.iter_modules(lcpaq.allocation.__path__)
)

# A meta-path finder that refuses torch (and its submodules), as if it were not installed.
BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked: {name}")
        return None
sys.meta_path.insert(0, _NoTorch())
"""


def test_allocation_package_has_the_expected_modules() -> None:
    assert {"lcpaq.allocation.problem", "lcpaq.allocation.table", "lcpaq.allocation.costs"} <= set(
        MODULES
    )


def test_every_allocation_module_imports_without_torch() -> None:
    imports = "\n".join(f"import {name}" for name in ["lcpaq.allocation", *MODULES])
    check = "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", f"{BLOCK_TORCH}\n{imports}\n{check}\nprint('ok')"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# A whole allocation on a hand-made table: costs (with activation and sign bits, which read the
# format registry), frontiers, a budgeted solve and a Pareto sweep, all with torch blocked.
ALLOCATE = """
import numpy as np
from lcpaq.allocation.budgets import parse_budget
from lcpaq.allocation.costs import build_cost_model
from lcpaq.allocation.frontier import build_frontiers, score_candidates
from lcpaq.allocation.problem import AllocationProblem
from lcpaq.allocation.table import CandidateTable, pair_candidates

num_params = np.array([10, 20, 30])
bits = np.array([2, 4, 8])
weight_bits = num_params[:, None] * bits[None, :].astype(float)
error = np.array([[16.0, 4.0, 0.25], [8.0, 2.0, 0.5], [32.0, 1.0, 0.125]])
table = CandidateTable(
    layer_names=("a", "b", "c"), format_names=("int2", "int4", "fp8_e4m3"), num_params=num_params,
    bits=bits, weight_bits=weight_bits, size_bits=weight_bits, error_sq=error,
    weighted_error=np.full(error.shape, np.nan),
)
table = pair_candidates(table, ("int8", "fp8_e4m3"))
scores = score_candidates(table, np.array([1.0, 2.0, 3.0]), "hawq_v2")
costs = build_cost_model(
    table, macs_per_sample=np.array([1e6, 2e6, 3e6]),
    weight_sign_bits=table.weight_sign_bits(symmetric=False),
    activation_sign_bits=table.activation_sign_bits,
)
problem = AllocationProblem(table, scores, build_frontiers(table, scores), costs=costs)
allocation = problem.solve([parse_budget("avg-bits=4"), parse_budget("ebops-g=0.1")])
assert len(allocation.formats) == 3, allocation
"""


def test_an_allocation_runs_without_torch() -> None:
    root = Path(__file__).resolve().parents[2]
    check = "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    result = subprocess.run(
        [sys.executable, "-c", f"{BLOCK_TORCH}\n{ALLOCATE}\n{check}\nprint('ok')"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_the_blocker_does_block_torch() -> None:
    """The check above proves something only if the blocker makes ``import torch`` fail."""
    result = subprocess.run(
        [sys.executable, "-c", f"{BLOCK_TORCH}\nimport torch"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "torch is blocked" in result.stderr
