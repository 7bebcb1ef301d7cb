"""Calibration slices: which images feed curvature and correction, which the proxy.

Input: the calibration file's image count, the proxy rungs (``--proxy-samples``) and the space.
Output: `Slices`: the head [0, head) read by analysis and correction, and the disjoint proxy
tail, so no configuration is scored on the images it was calibrated on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lcpaq.config import RunConfig
from lcpaq.errors import InputError

if TYPE_CHECKING:
    from lcpaq.search.space import SearchSpace


def parse_rungs(text: str) -> tuple[int, ...]:
    """``128,384,1152``: growing proxy slices with a constant whole ratio (the halving rate)."""
    try:
        rungs = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InputError(
            f"--proxy-samples {text!r}: give whole numbers, e.g. 128,384,1152"
        ) from None
    if not rungs or rungs[0] < 1:
        raise InputError(f"--proxy-samples {text!r}: give at least one positive sample count")
    if len(rungs) > 1:
        ratio = rungs[1] // rungs[0]
        geometric = all(b == a * ratio for a, b in zip(rungs, rungs[1:]))
        if ratio < 2 or not geometric:
            raise InputError(
                f"--proxy-samples {text!r}: successive halving needs each slice a whole multiple "
                "(>= 2, the same each time) of the one before, e.g. 128,384,1152"
            )
    return rungs


@dataclass(frozen=True)
class Slices:
    """Calibration images [0, head) feed curvature and correction; the proxy uses the tail
    [proxy_start, proxy_start + rungs[-1]); the two never overlap."""

    num_images: int
    head: int
    proxy_start: int
    rungs: tuple[int, ...]

    def to_dict(self) -> dict[str, object]:
        return {
            "calibration_images": self.num_images,
            "curvature_and_correction": [0, self.head],
            "proxy": [self.proxy_start, self.proxy_start + self.rungs[-1]],
            "proxy_rungs": list(self.rungs),
        }


def head_samples(config: RunConfig) -> int:
    """How many leading calibration images a configuration's analysis and correction read."""
    analysis = config.analysis
    used = [analysis.num_samples]
    if config.recovery.enabled:
        used.append(config.recovery.num_samples)
    if analysis.hutchinson_probes:
        used.append(analysis.hutchinson_samples)
    if getattr(analysis, "pairwise", "none") != "none":
        used.append(getattr(analysis, "pair_samples", 0))
    return max(used)


def plan_slices(num_images: int, rungs: Sequence[int], head: int, source: str) -> Slices:
    needed = head + rungs[-1]
    if needed > num_images:
        raise InputError(
            f"calibration file {source} has {num_images} images; the search needs {head} for "
            f"curvature/correction plus {rungs[-1]} disjoint proxy images ({needed}): give a "
            "larger file, smaller --proxy-samples, or --fix smaller sample counts"
        )
    return Slices(num_images, head, num_images - rungs[-1], tuple(rungs))


def space_head(space: SearchSpace, base: RunConfig) -> int:
    """The most leading images any configuration of the space reads (each dimension sets its own
    fields, so the maximum over each dimension's choices bounds every combination)."""
    defaults = space.config(base, space.default_params())
    most = head_samples(defaults)
    for dimension in space.dimensions:
        for choice in dimension.choices:
            most = max(most, head_samples(dimension.apply(defaults, choice)))
    return most
