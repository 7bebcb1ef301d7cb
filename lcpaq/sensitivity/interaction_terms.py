"""Inter-layer terms: what they are (`InteractionTerms`), which layer pairs get them (`select_pairs`),
and their file ``interactions.npz``. Needs numpy only (no torch), like the allocation that reads it.

Written by the analyze stage (`lcpaq.sensitivity.interactions.compute_interactions`), read by the
allocate stage (`lcpaq.allocation.pairwise`) and the report. Pairs (i, j), i < j, are indices in the
execution order of `lcpaq.model.graph.discover_layers`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

Pair = tuple[int, int]


@dataclass(frozen=True)
class InteractionTerms:
    """Cross terms C_ij(f, g) for selected layer pairs, with standard errors.

    ``cross[(i, j)]`` and ``stderr[(i, j)]`` are float64 ``[F, F]`` arrays indexed by (format of
    layer i, format of layer j), for ``i < j`` indices into ``layer_names``. ``diagonal[l, f]`` is
    the matching single-layer term: Δw_l(f)ᵀ H_ll Δw_l(f) (``hessian``/``gauss_newton``) or the
    measured loss increase δ_l(f) (``measured``), with ``diagonal_stderr``.
    """

    layer_names: tuple[str, ...]
    format_names: tuple[str, ...]
    cross: dict[Pair, np.ndarray]
    stderr: dict[Pair, np.ndarray]
    diagonal: np.ndarray
    diagonal_stderr: np.ndarray
    method: str
    num_samples: int

    @property
    def pairs(self) -> tuple[Pair, ...]:
        return tuple(sorted(self.cross))

    def stacked(self) -> tuple[np.ndarray, np.ndarray]:
        """Cross terms and their standard errors in `pairs` order, [P, F, F] each."""
        return (
            np.array([self.cross[pair] for pair in self.pairs]),
            np.array([self.stderr[pair] for pair in self.pairs]),
        )

    def header(self) -> dict[str, object]:
        """What every summary of the terms starts with: their source, samples and counts."""
        return {
            "method": self.method,
            "num_samples": self.num_samples,
            "formats": list(self.format_names),
            "num_pairs": len(self.pairs),
            "num_terms": int(self.stacked()[0].size),
        }

    def significant(self, num_stderr: float = 2.0) -> dict[Pair, np.ndarray]:
        """Cross terms with entries below ``num_stderr`` standard errors set to 0 (METHOD §1c)."""
        return {
            pair: np.where(np.abs(value) >= num_stderr * self.stderr[pair], value, 0.0)
            for pair, value in self.cross.items()
        }


PairRule = Literal["window", "block", "all"]
PAIR_RULES: tuple[str, ...] = ("window", "block", "all")
PairSource = Literal["none", "hessian", "gauss-newton", "forward"]
PAIR_SOURCES: tuple[str, ...] = ("none", "hessian", "gauss-newton", "forward")


def residual_block(name: str) -> str:
    """The block a layer belongs to: its parent module, with a ``downsample``/``shortcut`` branch
    folded into the block that holds it (``layer1.0.downsample.0`` → ``layer1.0``)."""
    parts = name.split(".")[:-1]
    for index, part in enumerate(parts):
        if part in ("downsample", "shortcut"):
            return ".".join(parts[:index])
    return ".".join(parts)


def select_pairs(
    num_layers: int,
    rule: PairRule = "window",
    window: int = 3,
    layer_names: Sequence[str] | None = None,
) -> tuple[Pair, ...]:
    """Layer pairs (i, j), i < j, in execution order.

    ``window``: 0 < j − i ≤ ``window``; ``block``: layers of the same residual block
    (`residual_block`, needs ``layer_names``; top-level layers have no partner); ``all``: every pair.
    """
    if rule == "block":
        if layer_names is None or len(layer_names) != num_layers:
            raise ValueError("pair rule 'block' needs one layer name per layer")
        blocks = [residual_block(name) for name in layer_names]
        return tuple(
            (i, j)
            for i in range(num_layers)
            for j in range(i + 1, num_layers)
            if blocks[i] and blocks[i] == blocks[j]
        )
    if rule == "all":
        window = num_layers
    elif rule != "window":
        raise ValueError(f"pair rule must be one of {', '.join(PAIR_RULES)}, got {rule!r}")
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    return tuple(
        (i, j) for i in range(num_layers) for j in range(i + 1, min(num_layers, i + window + 1))
    )


def check_pairs(pairs: Sequence[Pair], num_layers: int) -> tuple[Pair, ...]:
    """The distinct pairs, sorted, each checked to be (i, j) with 0 <= i < j < ``num_layers``."""
    checked = tuple(sorted({(int(i), int(j)) for i, j in pairs}))
    for i, j in checked:
        if not 0 <= i < j < num_layers:
            raise ValueError(f"pair {(i, j)} must satisfy 0 <= i < j < {num_layers}")
    return checked


def save_interactions(path: Path, terms: InteractionTerms) -> Path:
    """Write ``interactions.npz``: pairs [P, 2], cross/stderr [P, F, F], names, diagonal, meta."""
    from lcpaq import runfolder

    pairs = terms.pairs
    num_formats = len(terms.format_names)
    arrays = {
        "layer_names": np.array(terms.layer_names),
        "format_names": np.array(terms.format_names),
        "pairs": np.array(pairs, dtype=np.int64).reshape(-1, 2),
        "cross": np.array([terms.cross[p] for p in pairs]).reshape(-1, num_formats, num_formats),
        "stderr": np.array([terms.stderr[p] for p in pairs]).reshape(-1, num_formats, num_formats),
        "diagonal": terms.diagonal,
        "diagonal_stderr": terms.diagonal_stderr,
        "method": np.array(terms.method),
        "num_samples": np.array(terms.num_samples),
    }
    return runfolder.write_npz(Path(path), arrays)


def load_interactions(path: Path) -> InteractionTerms:
    """Read `save_interactions`'s ``interactions.npz``."""
    from lcpaq import runfolder

    arrays = runfolder.read_npz(Path(path), "interaction terms")
    pairs = [(int(i), int(j)) for i, j in arrays["pairs"]]
    return InteractionTerms(
        layer_names=tuple(str(name) for name in arrays["layer_names"]),
        format_names=tuple(str(name) for name in arrays["format_names"]),
        cross={pair: arrays["cross"][k] for k, pair in enumerate(pairs)},
        stderr={pair: arrays["stderr"][k] for k, pair in enumerate(pairs)},
        diagonal=arrays["diagonal"],
        diagonal_stderr=arrays["diagonal_stderr"],
        method=str(arrays["method"]),
        num_samples=int(arrays["num_samples"]),
    )
