"""One configuration through the stages, from the caches: what a trial measures.

Input: a trial's `RunConfig`. Output: `Prepared`: the allocation of the ``allocate`` stage's
solve (HiGHS) over the cached analysis in memory (`lcpaq.stages.allocate.ProblemData`, no run
folder written), the timings, and on request the quantized and corrected model, built from the
cached weights by the export stage's recovery (`lcpaq.stages.export.recover_quantized`).
`SearchContext.write_analysis` writes the analysed run folder of ``best/`` (the search's output,
which ``lcpaq export`` and the other stages accept).
"""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lcpaq import runfolder
from lcpaq.allocation.budgets import parse_budget
from lcpaq.allocation.result import Allocation
from lcpaq.allocation.table import CandidateTable
from lcpaq.config import RunConfig
from lcpaq.errors import InputError
from lcpaq.model.data import load_dataset
from lcpaq.model.recovery import ReferenceStats, collect_reference_stats
from lcpaq.model.zoo import file_sha256, load_model, num_classes_of
from lcpaq.quant.activations import activation_quantizers
from lcpaq.search.cache import AnalysisCache, layer_weight
from lcpaq.search.proxy import ProxyScorer
from lcpaq.search.slices import Slices, plan_slices, space_head
from lcpaq.search.space import SearchSpace
from lcpaq.sensitivity.interaction_terms import load_interactions
from lcpaq.stages import pipeline
from lcpaq.stages.allocate import ProblemData, check_solvable, optimum, problem_of
from lcpaq.stages.folder import read_layers, read_layers_file

#: Analysis artifacts ``best/`` takes from the curvature cache folder as they are.
_CURVATURE_FILES = ("layers.json", "curvature.npz", "hutchinson.npz")


class Infeasible(Exception):
    """The allocation stage found no assignment for this configuration under the budgets."""

    def __init__(self, message: str, timings: Mapping[str, float]) -> None:
        super().__init__(message)
        self.timings = dict(timings)


@dataclass
class Prepared:
    config: RunConfig
    allocation: Allocation
    quantized: nn.Module | None
    timings: dict[str, float]


class SearchContext:
    """What every trial of one process shares: the caches (curvature, quantized weights, ...),
    the calibration slices, the proxy with its FP32 outputs, and the FP32 correction statistics.
    `SearchContext.open` loads the model and data; the constructor only stores them."""

    def __init__(self, cache: AnalysisCache, slices: Slices, scorer: ProxyScorer) -> None:
        self.cache, self.slices, self.scorer = cache, slices, scorer
        self._reference: dict[int, ReferenceStats] = {}

    @classmethod
    def open(
        cls,
        base: RunConfig,
        run_dir: Path,
        space: SearchSpace,
        proxy: str,
        rungs: Sequence[int],
        *,
        max_cached_weights: int = 96,
    ) -> SearchContext:
        """Load the FP32 model and calibration data of ``base``, plan the slices, compute the
        proxy's FP32 outputs; the caches live in ``run_dir/cache``."""
        analysis = base.analysis
        model = load_model(
            analysis.model, analysis.checkpoint, allow_unsafe_pickle=analysis.allow_unsafe_pickle
        ).eval()
        calib = load_dataset(
            analysis.calib,
            normalization=analysis.normalize,
            num_classes=num_classes_of(model),
            image_size=analysis.image_size,
        )
        slices = plan_slices(len(calib), rungs, space_head(space, base), analysis.calib)
        proxy_data = calib.subset(slices.proxy_start, slices.num_images)
        scorer = ProxyScorer.build(proxy, model, proxy_data)
        identity = {
            "checkpoint": file_sha256(Path(analysis.checkpoint)) if analysis.checkpoint else "",
            "calib": file_sha256(Path(analysis.calib)) if Path(analysis.calib).is_file() else "",
        }
        cache = AnalysisCache(
            base, run_dir / "cache", model, calib, identity, max_cached_weights=max_cached_weights
        )
        return cls(cache, slices, scorer)

    # -- best/'s run folder ----------------------------------------------------------------
    def write_analysis(
        self,
        run_dir: Path,
        config: RunConfig,
        cache_folder: Path,
        table: CandidateTable,
    ) -> None:
        """Make ``run_dir`` an analysed run folder: the artifacts ``analyze`` would write,
        copied from the caches (``best/`` outlives a cleared cache)."""
        cache = self.cache
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        for name in _CURVATURE_FILES:
            if (cache_folder / name).is_file():
                shutil.copyfile(cache_folder / name, run_dir / name)
        if cache.input_hessians(config) is not None:  # export (of best/) reads them from here
            shutil.copyfile(
                cache.input_hessians_path(config.analysis.num_samples),
                run_dir / pipeline.INPUT_HESSIANS_FILE,
            )
        if config.analysis.act_formats:  # the allocation's score and export read it
            cache.activations(config)  # cached; measured here for the size cap and a resumed best/
            shutil.copyfile(cache.activations_path(config), run_dir / "activations.npz")
        runfolder.save_candidates(run_dir / "candidates.npz", table)
        runfolder.write_json(run_dir / "run_config.json", config.to_dict())

    # -- allocation in memory ---------------------------------------------------------------
    def problem_data(
        self, config: RunConfig, table: CandidateTable, interactions: Path | None = None
    ) -> ProblemData:
        """What the ``allocate`` stage reads from an analysed run folder, from the caches:
        the layer list and sizes (of the curvature cache folder), the candidate table, the
        curvature, the activation sensitivity (paired tables) and, when they enter
        (``pairwise_weight`` ≠ 0), the inter-layer terms of ``interactions``."""
        cache = self.cache
        folder, estimate, _ = cache.curvature(config)
        layers, unquantized_bits = read_layers(folder)
        fp32_bits = float(read_layers_file(folder, "layer list")["fp32_size_bits"])
        activations = cache.activations(config)[0] if table.paired else None
        weight = config.allocation.pairwise_weight
        return ProblemData(
            layers,
            unquantized_bits,
            fp32_bits,
            table,
            estimate,
            activations,
            load_interactions(interactions) if interactions and weight != 0 else None,
            config.analysis.scheme.symmetric,
            source=str(cache.activations_path(config)),
        )

    def allocate(self, config: RunConfig, data: ProblemData) -> Allocation:
        """The ``allocate`` stage's solve over ``data`` (`problem_of`, `check_solvable`,
        `optimum`), nothing written."""
        budgets = [parse_budget(text) for text in config.allocation.budgets]
        options = config.allocation.options()
        cost_weights = options.pop("cost_weights", None)
        problem, _, _ = problem_of(data, **options)
        check_solvable(problem, budgets, cost_weights)
        return optimum(problem, budgets, cost_weights)

    def prepare(self, config: RunConfig, *, build: bool = True) -> Prepared:
        """Curvature (cached), candidates (cached weights), the allocate stage's solve over
        them in memory, then (``build``) the quantized and corrected model, as ``export``
        builds it."""
        cache = self.cache
        timings = {}
        _, estimate, timings["hessian_s"] = cache.curvature(config)
        _, seconds = cache.activations(config)
        timings["hessian_s"] += seconds  # curvature work, in the report's Hessian share
        start = time.perf_counter()
        table = cache.table(config, estimate)
        timings["candidates_s"] = time.perf_counter() - start
        start = time.perf_counter()
        pairs_path = None
        if config.analysis.pairwise != "none":
            pairs_path, seconds = cache.interactions(config)
            timings["hessian_s"] += seconds  # curvature work, in the report's Hessian share
        try:
            allocation = self.allocate(config, self.problem_data(config, table, pairs_path))
        except InputError as error:
            timings["ilp_s"] = time.perf_counter() - start
            raise Infeasible(str(error), timings) from None
        timings["ilp_s"] = time.perf_counter() - start
        prepared = Prepared(config, allocation, None, timings)
        if build:
            self.build(prepared)
        return prepared

    def build(self, prepared: Prepared) -> nn.Module:
        """The quantized and corrected model of a prepared configuration (timed once)."""
        if prepared.quantized is None:
            start = time.perf_counter()
            prepared.quantized = self.quantized_model(prepared.config, prepared.allocation)
            prepared.timings["correction_s"] = time.perf_counter() - start
        return prepared.quantized

    # -- quantized model -------------------------------------------------------------------
    def reference(self, num_samples: int, names: Sequence[str]) -> ReferenceStats:
        """The FP32 model's statistics on the first ``num_samples`` images, once per count."""
        if num_samples not in self._reference:
            self._reference[num_samples] = collect_reference_stats(
                self.cache.model, self.cache.calib.inputs[:num_samples], names
            )
        return self._reference[num_samples]

    @torch.no_grad()
    def quantized_model(self, config: RunConfig, allocation: Allocation) -> nn.Module:
        """The FP32 model with the cached quantized weights of ``allocation``, then the export
        stage's recovery (input quantizers, statistics correction) on the correction images."""
        cache = self.cache
        assignment = pipeline.weight_assignment(allocation.layer_names, allocation.formats)
        quantized = copy.deepcopy(cache.model).eval()
        for name, format_name in assignment.items():
            weights = cache.quantized_weights(
                config.analysis.scheme, format_name, config.analysis.num_samples
            )
            layer_weight(quantized, name).copy_(weights[name])
        sensitivity, _ = cache.activations(config)
        input_quantizers = {}
        if sensitivity is not None:  # inputs quantized before the correction, as export does
            formats = pipeline.paired_activation_formats(allocation.layer_names, allocation.formats)
            input_quantizers = activation_quantizers(sensitivity, formats)
        names = list(assignment)
        correction_inputs, reference = None, None
        if config.recovery.enabled:
            count = min(config.recovery.num_samples, len(cache.calib))
            correction_inputs = cache.calib.inputs[:count]
            reference = self.reference(count, names)
        pipeline.recover_quantized(
            cache.model,
            quantized,
            names,
            config,
            correction_inputs,
            reference,
            input_quantizers,
        )
        return quantized
