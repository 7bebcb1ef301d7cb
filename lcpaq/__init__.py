"""lcpaq: post-training Hessian sensitivity analysis and mixed-precision allocation for PyTorch."""

from __future__ import annotations

__version__ = "0.1.0"

from lcpaq.export import load_quantized  # noqa: E402

__all__ = ["__version__", "load_quantized"]
