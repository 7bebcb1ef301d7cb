"""The search space: the searched dimensions with their choices, and ``--fix`` / ``--also``.

Input: `SearchOptions` (``--fix NAME=VALUE``, ``--also NAME``, the budgets). Output: a
`SearchSpace` that Optuna samples (`SearchSpace.suggest`) and that maps a trial's parameters to
the `RunConfig` the stages run (`SearchSpace.config`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import optuna

from lcpaq.allocation.budgets import counts_activation_bits
from lcpaq.config import RunConfig
from lcpaq.errors import InputError
from lcpaq.search.dimensions import Dimension, default_dimensions

if TYPE_CHECKING:
    from lcpaq.search.options import SearchOptions


@dataclass(frozen=True)
class SearchSpace:
    dimensions: tuple[Dimension, ...] = field(default_factory=default_dimensions)

    @classmethod
    def default(cls, also: Sequence[str] = ()) -> SearchSpace:
        """The default dimensions; optional ones pinned to their default unless named in ``also``."""
        dimensions = default_dimensions()
        names = {dimension.name for dimension in dimensions}
        for name in also:
            if name not in names:
                raise InputError(
                    f"--also {name}: no such search dimension; known: {', '.join(names)}"
                )
        return cls(
            tuple(
                d if not d.optional or d.name in also else replace(d, choices=(d.default,))
                for d in dimensions
            )
        )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(dimension.name for dimension in self.dimensions)

    @property
    def size(self) -> int:
        """The number of distinct configurations."""
        return math.prod(len(dimension.choices) for dimension in self.dimensions)

    def dimension(self, name: str) -> Dimension:
        for dimension in self.dimensions:
            if dimension.name == name:
                return dimension
        raise InputError(f"--fix {name}: no such search dimension; known: {', '.join(self.names)}")

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        return {d.name: trial.suggest_categorical(d.name, d.choices) for d in self.dimensions}

    def with_default(self, name: str, value: Any) -> SearchSpace:
        """The same choices with another default (the configuration trial 0 measures)."""
        self.dimension(name)  # an unknown name fails here
        return SearchSpace(
            tuple(replace(d, default=value) if d.name == name else d for d in self.dimensions)
        )

    def default_params(self) -> dict[str, Any]:
        return {dimension.name: dimension.default for dimension in self.dimensions}

    def config(self, base: RunConfig, params: Mapping[str, Any]) -> RunConfig:
        """``params`` without a dimension (a trial of a study made before it existed) leave it
        at its default."""
        for dimension in self.dimensions:
            base = dimension.apply(base, params.get(dimension.name, dimension.default))
        return base

    def fix(self, values: Mapping[str, str], base: RunConfig) -> SearchSpace:
        """The space with some dimensions pinned to one value (also the default's value)."""
        dimensions = list(self.dimensions)
        for name, text in values.items():
            index = self.names.index(self.dimension(name).name)
            dimension = dimensions[index]
            try:
                value = dimension.parse(text)
                dimension.apply(base, value)  # a value the pipeline rejects fails here
            except InputError as error:
                raise InputError(f"--fix {name}={text}: {error}") from None
            dimensions[index] = replace(dimension, choices=(value,), default=value)
        return SearchSpace(tuple(dimensions))

    def describe(self) -> list[dict[str, object]]:
        return [
            {"name": d.name, "option": d.option, "choices": list(d.choices), "default": d.default}
            for d in self.dimensions
        ]


def parse_fix(texts: Sequence[str]) -> dict[str, str]:
    values = {}
    for text in texts:
        name, sep, value = text.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise InputError(f"--fix {text!r}: use NAME=VALUE, e.g. --fix num_samples=256")
        values[name.strip()] = value.strip()
    return values


def search_space(options: SearchOptions) -> SearchSpace:
    """The searched space: the default dimensions, ``--also`` and ``--fix``. Under a budget that
    counts activation bits every configuration, the default included, quantizes its layer inputs
    to INT8 unless told otherwise: weights-only checkpoints would keep FP32 activations that the
    cost model counts as 8-bit, and the search would compare real costs with assumed ones."""
    space = SearchSpace.default(options.also)
    if (
        counts_activation_bits(options.base.allocation.budgets)
        and "act_formats" not in options.fixed
    ):
        if "act_formats" in options.also:
            space = space.with_default("act_formats", "int8")
        else:
            space = space.fix({"act_formats": "int8"}, options.base)
    return space.fix(options.fixed, options.base)
