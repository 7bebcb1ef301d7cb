"""Cached analysis of one search folder: what trials share instead of recomputing.

Input: the FP32 model, the calibration data, the identity (SHA-256) of the checkpoint and data
files, and a trial's `RunConfig`. Output, each computed once per distinct key
(`lcpaq.search.keys`) and kept under ``OUT/cache/`` so a resumed search reloads it: the
curvature (by the ordinary ``analyze`` stage), the inter-layer terms, the activation sensitivity,
GPTQ's input second moments, the fake-quantized weights per (scheme, format), and the candidate
table built from those weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lcpaq import runfolder
from lcpaq.allocation.table import CandidateTable
from lcpaq.config import RunConfig
from lcpaq.model.data import Dataset
from lcpaq.model.graph import LayerInfo, get_module
from lcpaq.model.graph import layer_weight as graph_layer_weight
from lcpaq.quant.formats import QuantScheme, get_format
from lcpaq.quant.input_stats import collect_input_hessians
from lcpaq.quant.weights import fake_quantize_formats
from lcpaq.search.keys import activations_key, curvature_key, interactions_key, scheme_slug
from lcpaq.sensitivity.activation import ActivationSensitivity
from lcpaq.sensitivity.activation_file import (
    load_activation_sensitivity,
    save_activation_sensitivity,
)
from lcpaq.sensitivity.candidates import table_from_weights
from lcpaq.sensitivity.curvature import CurvatureEstimate
from lcpaq.stages import pipeline


def candidate_table(
    layers: Sequence[LayerInfo],
    weights: Mapping[str, torch.Tensor],
    quantized: Mapping[str, Mapping[str, torch.Tensor]],
    format_names: Sequence[str],
    scheme: QuantScheme,
    diagonal: Mapping[str, np.ndarray] | None,
    activation_formats: Sequence[str] = (),
    input_hessians: Mapping[str, torch.Tensor] | None = None,
) -> CandidateTable:
    """`lcpaq.sensitivity.candidates.measure_candidates` from already quantized weights
    (``quantized[format][layer]``): the same arithmetic, without quantizing again."""
    by_layer = {
        layer.name: [quantized[name][layer.name] for name in format_names] for layer in layers
    }
    return table_from_weights(
        layers,
        weights,
        by_layer,
        format_names,
        scheme,
        diagonal,
        activation_formats,
        input_hessians,
    )


@contextmanager
def quiet(name: str) -> Iterator[None]:
    """Silence a logger's INFO lines (the stages log one per call; a search makes hundreds)."""
    target = logging.getLogger(name)
    level = target.level
    target.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        target.setLevel(level)


def layer_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The weight tensor of layer ``name`` as the quantizer sees it (`lcpaq.model.graph.layer_weight`)."""
    return graph_layer_weight(get_module(model, name))


def _analysis_config_of(config: RunConfig) -> RunConfig:
    """The configuration the curvature cache runs ``analyze`` with: the same curvature options,
    the cheapest candidate table (one min-max format), no inter-layer terms and no budgets (each
    trial's own candidates are checked against the budgets when it allocates)."""
    changes: dict[str, Any] = {"formats": ("int8",), "scheme": QuantScheme(clipping="minmax")}
    names = {item.name for item in fields(config.analysis)}
    if "act_formats" in names:
        changes["act_formats"] = ()
    if "pairwise" in names:
        changes["pairwise"] = "none"
    return config.with_analysis(**changes).with_allocation(budgets=())


class AnalysisCache:
    """The caches of one search folder (``cache_dir``) for one FP32 model and calibration set.

    ``identity`` holds the SHA-256 of the checkpoint and calibration files, so a folder reused
    with other files recomputes. The layer list and FP32 weights are read by the first
    `curvature` call (from its analysis folder)."""

    def __init__(
        self,
        base: RunConfig,
        cache_dir: Path,
        model: nn.Module,
        calib: Dataset,
        identity: Mapping[str, str],
        *,
        max_cached_weights: int = 96,
    ) -> None:
        self.base, self.cache_dir, self.model, self.calib = base, cache_dir, model, calib
        self.identity = dict(identity)
        self._curvature: dict[str, tuple[Path, CurvatureEstimate]] = {}
        self._weights: OrderedDict[tuple[str, str], dict[str, torch.Tensor]] = OrderedDict()
        self._max_cached_weights = max_cached_weights
        self._input_hessians: dict[int, dict[str, torch.Tensor]] = {}
        self._activations: dict[Path, ActivationSensitivity] = {}
        self.layers: tuple[LayerInfo, ...] | None = None
        self.fp_weights: dict[str, torch.Tensor] = {}
        self.analyze_calls = 0

    # -- curvature -------------------------------------------------------------------------
    def curvature(self, config: RunConfig) -> tuple[Path, CurvatureEstimate, float]:
        """(cache folder, estimate, seconds spent computing it now: 0 on a cache hit)."""
        key = curvature_key(config, self.identity)
        if key in self._curvature:
            return (*self._curvature[key], 0.0)
        folder = self.cache_dir / f"curvature-n{config.analysis.num_samples}-{key}"
        seconds = 0.0
        # ``analyze`` writes candidates.npz last, so its presence marks a complete analysis.
        if not (folder / "candidates.npz").is_file():
            start = time.perf_counter()
            with quiet("lcpaq.stages"):
                pipeline.analyze(_analysis_config_of(config), folder, progress=False)
            self.analyze_calls += 1
            seconds = time.perf_counter() - start
            runfolder.write_json(folder / "cache_key.json", {"key": key, **self.identity})
        estimate = runfolder.load_curvature(folder / "curvature.npz")
        if self.layers is None:
            self.layers, _ = pipeline.read_layers(folder)
            self.fp_weights = {
                layer.name: layer_weight(self.model, layer.name).detach().clone()
                for layer in self.layers
            }
        self._curvature[key] = (folder, estimate)
        return folder, estimate, seconds

    def interactions(self, config: RunConfig) -> tuple[Path, float]:
        """``interactions.npz`` for this configuration's pair options, scheme and formats:
        computed once per distinct key by the ordinary ``analyze`` code (seconds spent now)."""
        assert self.layers is not None, "curvature() loads the layer list first"
        folder = self.cache_dir / f"pairs-{interactions_key(config, self.identity)}"
        path = folder / "interactions.npz"
        if path.is_file():
            return path, 0.0
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with quiet("lcpaq.stages"):
            pipeline.analyze_interactions(
                config,
                self.model,
                self.layers,
                folder,
                progress=False,
                input_hessians=self.input_hessians(config),
            )
        return path, time.perf_counter() - start

    def activations(self, config: RunConfig) -> tuple[ActivationSensitivity | None, float]:
        """The activation sensitivity and ranges of the configuration's activation formats on
        its curvature images, as ``analyze`` measures them, once per distinct key (seconds spent
        now); None without activation formats."""
        if not config.analysis.act_formats:
            return None, 0.0
        assert self.layers is not None, "curvature() loads the layer list first"
        path = self.activations_path(config)
        if path in self._activations:
            return self._activations[path], 0.0
        seconds = 0.0
        if path.is_file():
            sensitivity = load_activation_sensitivity(path)
        else:
            start = time.perf_counter()
            inputs = self.calib.inputs[: config.analysis.num_samples]
            sensitivity = pipeline.measure_activations(config, self.model, self.layers, inputs)
            save_activation_sensitivity(path, sensitivity)
            seconds = time.perf_counter() - start
        self._activations[path] = sensitivity
        return sensitivity, seconds

    def activations_path(self, config: RunConfig) -> Path:
        key = activations_key(config, self.identity)
        return self.cache_dir / f"activations-n{config.analysis.num_samples}-{key}.npz"

    # -- quantized weights -----------------------------------------------------------------
    def input_hessians(self, config: RunConfig) -> dict[str, torch.Tensor] | None:
        """GPTQ's per-layer input second moments on the configuration's curvature images (as
        ``analyze`` computes them), once per image count; None for round-to-nearest."""
        if config.analysis.scheme.rounding != "gptq":
            return None
        return self._hessians_of_first(config.analysis.num_samples)

    def _hessians_of_first(self, samples: int) -> dict[str, torch.Tensor]:
        """The input second moments on the first ``samples`` calibration images (as many as
        there are, if fewer), from memory, the cache folder, or computed and cached."""
        assert self.layers is not None, "curvature() loads the layer list first"
        count = min(samples, len(self.calib))
        if count not in self._input_hessians:
            path = self.input_hessians_path(count)
            if path.is_file():
                hessians = runfolder.load_tensors(path, "input Hessians")
            else:
                hessians = collect_input_hessians(
                    self.model,
                    [layer.name for layer in self.layers],
                    self.calib.inputs[:count],
                    batch_size=self.base.analysis.batch_size,
                )
                runfolder.save_tensors(path, hessians)
            self._input_hessians[count] = hessians
        return self._input_hessians[count]

    def _input_hessians_tag(self, samples: int) -> str:
        """``n<count>-<hash>`` of everything the input second moments of the first ``samples``
        images depend on: model, images, their normalisation and count."""
        count = min(samples, len(self.calib))
        analysis = self.base.analysis
        data = {
            **self.identity,
            "count": count,
            "normalize": analysis.normalize,
            "image_size": analysis.image_size,
        }
        key = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
        return f"n{count}-{key}"

    def input_hessians_path(self, samples: int) -> Path:
        return self.cache_dir / f"input-hessians-{self._input_hessians_tag(samples)}.safetensors"

    def quantized_weights(
        self, scheme: QuantScheme, format_name: str, samples: int = 0
    ) -> dict[str, torch.Tensor]:
        """Fake-quantized weight of every layer (what export stores, decoded), cached. GPTQ
        rounding reads the input second moments of the first ``samples`` calibration images."""
        return self.quantized_weight_sets(scheme, (format_name,), samples)[format_name]

    def quantized_weight_sets(
        self, scheme: QuantScheme, format_names: Sequence[str], samples: int = 0
    ) -> dict[str, dict[str, torch.Tensor]]:
        """`quantized_weights` of several formats; the ones not cached yet are computed together
        (GPTQ rounds the INT formats of a layer in one pass)."""
        assert self.layers is not None, "curvature() loads the layer list first"
        slug = scheme_slug(scheme)
        hessians = None
        if scheme.rounding == "gptq":
            hessians = self._hessians_of_first(samples)
            slug += f"-{self._input_hessians_tag(samples)}"
        scheme_key = json.dumps(scheme.to_dict(), sort_keys=True) + slug
        names = [layer.name for layer in self.layers]
        found: dict[str, dict[str, torch.Tensor]] = {}
        for format_name in format_names:
            key = (scheme_key, format_name)
            if key in self._weights:
                self._weights.move_to_end(key)
                found[format_name] = self._weights[key]
                continue
            path = self.cache_dir / "weights" / slug / f"{format_name}.safetensors"
            if path.is_file():
                with safe_open(str(path), "pt") as handle:
                    same = handle.metadata() == self._weights_metadata(
                        scheme_key, format_name
                    ) and sorted(handle.keys()) == sorted(names)
                if same:  # else another scheme or checkpoint wrote it: recompute
                    found[format_name] = load_file(str(path))
        missing = [name for name in format_names if name not in found]
        if missing:
            fmts = [get_format(name) for name in missing]
            per_layer = {
                layer: fake_quantize_formats(
                    self.fp_weights[layer], fmts, scheme, hessians[layer] if hessians else None
                )
                for layer in names
            }
            for position, format_name in enumerate(missing):
                weights = {layer: per_layer[layer][position].contiguous() for layer in names}
                path = self.cache_dir / "weights" / slug / f"{format_name}.safetensors"
                with runfolder.atomic_path(path) as temp:
                    metadata = self._weights_metadata(scheme_key, format_name)
                    save_file(weights, str(temp), metadata=metadata)
                found[format_name] = weights
        for format_name in format_names:
            self._weights[(scheme_key, format_name)] = found[format_name]
            self._weights.move_to_end((scheme_key, format_name))
        while len(self._weights) > self._max_cached_weights:
            self._weights.popitem(last=False)
        return {name: found[name] for name in format_names}

    def _weights_metadata(self, scheme_key: str, format_name: str) -> dict[str, str]:
        return {
            "scheme": scheme_key,
            "format": format_name,
            "checkpoint": self.identity["checkpoint"],
        }

    def table(self, config: RunConfig, estimate: CurvatureEstimate) -> CandidateTable:
        assert self.layers is not None
        analysis = config.analysis
        quantized = self.quantized_weight_sets(
            analysis.scheme, analysis.formats, analysis.num_samples
        )
        return candidate_table(
            self.layers,
            self.fp_weights,
            quantized,
            analysis.formats,
            analysis.scheme,
            estimate.diagonal,
            analysis.act_formats,
            self.input_hessians(config),
        )
