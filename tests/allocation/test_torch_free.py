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
