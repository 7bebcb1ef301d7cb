"""Cache keys: what each cached result depends on, hashed.

Input: a `RunConfig` (and, for the quantized model, its `Allocation`) plus the identity of the
checkpoint and data files. Output: short hex keys naming cache folders and files under
``OUT/cache/``, and the `model_key` under which trials share proxy values.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict

from lcpaq.allocation.result import Allocation
from lcpaq.config import RunConfig
from lcpaq.quant.formats import QuantScheme

#: AnalysisConfig fields that do not change the curvature (they change the candidates, or the
#: inter-layer terms, which the search does not cache).
_NOT_CURVATURE = ("scheme", "formats", "act_formats", "act_clipping", "allow_unsafe_pickle")


def curvature_key(config: RunConfig, identity: Mapping[str, str]) -> str:
    """Every analysis option that can change the curvature, plus the checkpoint and data files."""
    data = {
        name: value
        for name, value in asdict(config.analysis).items()
        if name not in _NOT_CURVATURE and not name.startswith("pair")
    }
    text = json.dumps({"analysis": data, "files": dict(identity)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def interactions_key(config: RunConfig, identity: Mapping[str, str]) -> str:
    """The curvature key plus what the inter-layer terms also depend on: the quantized weights
    (scheme, formats) and the pair options."""
    analysis = config.analysis
    data = {
        "curvature": curvature_key(config, identity),
        "scheme": analysis.scheme.to_dict(),
        "formats": list(analysis.formats),
        **{name: value for name, value in asdict(analysis).items() if name.startswith("pair")},
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def activations_key(config: RunConfig, identity: Mapping[str, str]) -> str:
    """The curvature key (same images, batches and seed) plus the activation formats and how
    their ranges are calibrated."""
    analysis = config.analysis
    data = {
        "curvature": curvature_key(config, identity),
        "act_formats": list(analysis.act_formats),
        "act_clipping": analysis.act_clipping,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def scheme_slug(scheme: QuantScheme) -> str:
    """A readable cache folder name for a scheme, e.g. ``asym-channel-mse100``."""
    parts = ["sym" if scheme.symmetric else "asym"]
    parts.append(
        f"group{scheme.group_size}" if scheme.granularity == "group" else scheme.granularity
    )
    if scheme.clipping == "mse":
        parts.append(f"mse{scheme.mse_grid_points}")
    elif scheme.clipping == "percentile":
        parts.append(f"p{scheme.percentile:g}")
    else:
        parts.append(scheme.clipping)
    if scheme.rounding == "gptq":
        parts.append(f"gptq{scheme.gptq_damp:g}")
    return "-".join(parts)


def model_key(config: RunConfig, allocation: Allocation) -> str:
    """What fixes the quantized model: scheme, correction and the chosen formats. Configurations
    that differ elsewhere (curvature samples, scorer, first/last policy, format set) often
    allocate the same formats; they share this key and so their proxy values. GPTQ codes also
    depend on the curvature images, whose input second moments they are rounded against."""
    scheme = config.analysis.scheme
    data: dict[str, object] = {
        "scheme": scheme.to_dict(),
        "gptq_samples": config.analysis.num_samples if scheme.rounding == "gptq" else None,
        "recovery": asdict(config.recovery),
        "assignment": list(allocation.formats),
    }
    if config.analysis.act_formats:  # activation ranges come from the curvature images
        data["activations"] = activations_key(config, {})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
