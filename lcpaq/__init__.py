"""lcpaq: post-training Hessian sensitivity analysis and mixed-precision allocation for PyTorch.

Importing ``lcpaq`` imports nothing heavy: the public names below load their modules (and torch)
on first use, so ``import lcpaq.allocation`` works where torch is not installed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "load_quantized": "lcpaq.quant.checkpoint",
    # The Python API over objects in memory (docs/api.md).
    "quantize": "lcpaq.api",
    "QuantizeResult": "lcpaq.api",
    "analyze": "lcpaq.api",
    "allocate": "lcpaq.api",
    "export": "lcpaq.api",
    "evaluate": "lcpaq.api",
    "as_dataset": "lcpaq.api",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lcpaq' has no attribute {name!r}")
