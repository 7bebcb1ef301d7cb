"""The candidate table: what each (layer, candidate) costs and how much it perturbs the weights.

A *candidate* is a (weight format, activation format) pair. `CandidateTable` holds plain numpy
arrays [L, C] over layers × candidates (``candidates.npz``); analyze measures it
(`lcpaq.sensitivity.candidates.measure_candidates`), and scoring, frontiers and allocation read it
without torch, so re-allocating under a new budget takes seconds.

Columns are candidates. Without activation formats (``--act-formats`` not given) there is one
column per weight format, named after it (``int4``), and the cost models assume 8-bit activations
(`DEFAULT_ACTIVATION_FORMAT`). With activation formats every weight format is paired with every
activation format and the column is named ``weight/activation`` (``int4/fp8_e4m3``).

Numpy only: the bit widths of named formats come from the format registry
(`lcpaq.quant.formats`, plain Python), so building, costing and solving an allocation never
imports torch (tests/allocation/test_torch_free.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from lcpaq.errors import InputError
from lcpaq.quant.formats import FORMATS, LEVEL_KINDS, NumberFormat, get_format

#: What the cost models assume for activations when no activation formats are given.
DEFAULT_ACTIVATION_FORMAT = "int8"
#: Activation "formats" that leave activations in floating point (BitOps count their full width).
UNQUANTIZED_ACTIVATIONS = {"fp32": 32, "fp16": 16, "bf16": 16}
PAIR_SEPARATOR = "/"


def activation_bits(name: str) -> int:
    """Width of one activation in ``name`` (an INT or FP weight format name or fp32/fp16/bf16;
    the formats below two bits are for weights only)."""
    if name in UNQUANTIZED_ACTIVATIONS:
        return UNQUANTIZED_ACTIVATIONS[name]
    if name not in FORMATS or FORMATS[name].kind in LEVEL_KINDS:
        known = ", ".join(
            [
                *(n for n, f in FORMATS.items() if f.kind not in LEVEL_KINDS),
                *UNQUANTIZED_ACTIVATIONS,
            ]
        )
        raise InputError(f"unknown activation format {name!r}; known formats: {known}")
    return FORMATS[name].bits


def activation_sign_bits(name: str) -> int:
    """1 where an activation format stores a sign bit (floating point); INT activations are
    unsigned codes (asymmetric, after ReLU), as HGQ's EBOPs count them."""
    if name in UNQUANTIZED_ACTIVATIONS:
        return 1
    return 1 if get_format(name).kind == "fp" else 0


def _sign_bit(fmt: NumberFormat, symmetric: bool) -> int:
    if fmt.kind == "pruned":
        return 0
    return int(fmt.kind != "int" or symmetric)


def candidate_name(weight_format: str, activation_format: str, paired: bool) -> str:
    """Column name: the weight format alone, or ``weight/activation`` in a paired table."""
    return f"{weight_format}{PAIR_SEPARATOR}{activation_format}" if paired else weight_format


def weight_format_of(name: str) -> str:
    """The weight format of a candidate name (``int4/int8`` → ``int4``; ``int4`` → ``int4``)."""
    return name.split(PAIR_SEPARATOR, 1)[0]


def activation_format_of(name: str) -> str:
    """The activation format of a candidate name (``int4/fp8_e4m3`` → ``fp8_e4m3``; an unpaired
    name → `DEFAULT_ACTIVATION_FORMAT`)."""
    _, sep, activation = name.partition(PAIR_SEPARATOR)
    return activation if sep else DEFAULT_ACTIVATION_FORMAT


@dataclass(frozen=True)
class CandidateTable:
    """Arrays [L, C] over ``layer_names`` × candidates (``format_names``, the column names).

    ``weight_formats[c]`` / ``activation_formats[c]`` are the two halves of candidate c (a table
    saved before activation formats existed loads with the weight format as the column name and
    `DEFAULT_ACTIVATION_FORMAT`). ``weight_bits`` = n_l · b_w (what average bits count);
    ``size_bits`` adds the stored scales and zero points (`lcpaq.quant.formats.scale_overhead_bits`,
    which depends on the format: FP formats and MX have no zero points); ``error_sq`` =
    ‖Q_w(W_l) − W_l‖²; ``weighted_error`` = Σ diag(G_ll) ⊙ (Q_w(W_l) − W_l)² (NaN when no curvature
    diagonal was measured); ``output_error`` = the weight error seen through the layer's input
    second moments (`output_error`; NaN without them, e.g. round-to-nearest runs). ``bits[c]`` is
    the weight bits candidate c counts in budgets (`NumberFormat.budget_bits`: log2(3) for
    ternary, the code width otherwise). Weight arrays are equal across candidates that share a
    weight format.
    """

    layer_names: tuple[str, ...]
    format_names: tuple[str, ...]
    num_params: np.ndarray
    bits: np.ndarray
    weight_bits: np.ndarray
    size_bits: np.ndarray
    error_sq: np.ndarray
    weighted_error: np.ndarray
    weight_formats: tuple[str, ...] = ()
    activation_formats: tuple[str, ...] = ()
    output_error: np.ndarray | None = None
    learned_step: np.ndarray | None = None

    def __post_init__(self) -> None:
        # Frozen dataclass: fill the defaults of older tables in place, once.
        for name in ("output_error", "learned_step"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, np.full(np.shape(self.error_sq), np.nan))
        if not self.weight_formats:
            object.__setattr__(
                self, "weight_formats", tuple(weight_format_of(n) for n in self.format_names)
            )
        if not self.activation_formats:
            object.__setattr__(
                self, "activation_formats", (DEFAULT_ACTIVATION_FORMAT,) * len(self.format_names)
            )
        count = len(self.format_names)
        if len(self.weight_formats) != count or len(self.activation_formats) != count:
            raise ValueError("weight_formats and activation_formats need one entry per candidate")

    @property
    def paired(self) -> bool:
        """True when columns are named ``weight/activation`` (activation formats were chosen)."""
        return any(PAIR_SEPARATOR in name for name in self.format_names)

    @property
    def activation_bits(self) -> np.ndarray:
        """[C] activation width of every candidate (what BitOps and EBOPs multiply by)."""
        return np.array([activation_bits(name) for name in self.activation_formats], dtype=np.int64)

    @property
    def activation_sign_bits(self) -> np.ndarray:
        return np.array(
            [activation_sign_bits(name) for name in self.activation_formats], dtype=np.int64
        )

    def weight_sign_bits(self, symmetric: bool) -> np.ndarray:
        """[C] 1 where the weight codes carry a sign bit: FP, ternary and binary formats, and INT
        when symmetric; 0 for pruned (no code: a pruned weight costs no EBOPs)."""
        return np.array([_sign_bit(get_format(name), symmetric) for name in self.weight_formats])

    def format_index(self, name: str) -> int:
        try:
            return self.format_names.index(name)
        except ValueError:
            raise InputError(
                f"format {name!r} is not among the analysed candidates {list(self.format_names)}"
            ) from None

    def candidate_index(self, weight_format: str, activation_format: str | None = None) -> int:
        """Column of (weight, activation); ``activation_format`` None: the widest activation
        (at equal width the one named like the weight format, e.g. ``int8/int8``, then INT)."""
        columns = [c for c, name in enumerate(self.weight_formats) if name == weight_format]
        if activation_format is not None:
            columns = [c for c in columns if self.activation_formats[c] == activation_format]
        if not columns:
            pair = weight_format + ("" if activation_format is None else f"/{activation_format}")
            raise InputError(
                f"candidate {pair!r} is not among the analysed candidates {list(self.format_names)}"
            )
        acts = self.activation_formats
        return max(
            columns,
            key=lambda c: (
                int(self.activation_bits[c]),
                acts[c] == weight_format,
                acts[c].startswith("int"),
                -c,
            ),
        )

    def columns_of(self, names: Sequence[str]) -> list[int]:
        return [self.format_index(name) for name in names]

    def select(self, columns: Sequence[int]) -> CandidateTable:
        """The table restricted to these candidate columns (e.g. an INT-only candidate set)."""
        picked = list(columns)
        if not picked:
            raise InputError("a candidate table needs at least one candidate")
        return self.take(
            picked,
            [self.format_names[c] for c in picked],
            [self.activation_formats[c] for c in picked],
        )

    def take(
        self, source: Sequence[int], format_names: Sequence[str], activation_formats: Sequence[str]
    ) -> CandidateTable:
        """A table whose column k holds the weight arrays of column ``source[k]``, named
        ``format_names[k]``, with activation format ``activation_formats[k]``."""
        picked = list(source)
        if not len(picked) == len(format_names) == len(activation_formats):
            raise ValueError("give one name and one activation format per new column")
        assert self.output_error is not None and self.learned_step is not None  # __post_init__
        return CandidateTable(
            layer_names=self.layer_names,
            format_names=tuple(format_names),
            num_params=self.num_params,
            bits=self.bits[picked],
            weight_bits=self.weight_bits[:, picked],
            size_bits=self.size_bits[:, picked],
            error_sq=self.error_sq[:, picked],
            weighted_error=self.weighted_error[:, picked],
            weight_formats=tuple(self.weight_formats[c] for c in picked),
            activation_formats=tuple(activation_formats),
            output_error=self.output_error[:, picked],
            learned_step=self.learned_step[:, picked],
        )


def parse_activation_formats(text: str) -> tuple[str, ...]:
    """Parse ``"int8,int4,fp8_e4m3"`` into validated, de-duplicated names sorted by width."""
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not names:
        raise InputError("the activation format list is empty")
    return tuple(sorted(names, key=lambda name: (activation_bits(name), name)))


def pair_candidates(table: CandidateTable, activation_formats: Sequence[str]) -> CandidateTable:
    """Pair every weight format of an unpaired table with every activation format.

    Column order: weight formats in table order, activation formats in the given order within
    each. An empty ``activation_formats`` returns the table unchanged (default activations).
    """
    if not activation_formats:
        return table
    if table.paired:
        raise ValueError("the table is already paired with activation formats")
    for name in activation_formats:
        activation_bits(name)  # validates the name
    weights = list(range(len(table.format_names)))
    source = [w for w in weights for _ in activation_formats]
    acts = [a for _ in weights for a in activation_formats]
    names = [candidate_name(table.weight_formats[w], a, True) for w, a in zip(source, acts)]
    return table.take(source, names, acts)


def assign_activations(table: CandidateTable, activation_formats: Sequence[str]) -> CandidateTable:
    """A paired table with one given activation format per column of an unpaired table (e.g.
    the uniform baselines W8A8, W4A4)."""
    if table.paired:
        raise ValueError("the table is already paired with activation formats")
    if len(activation_formats) != len(table.format_names):
        raise ValueError("give one activation format per candidate")
    for name in activation_formats:
        activation_bits(name)  # validates the name
    names = [candidate_name(w, a, True) for w, a in zip(table.weight_formats, activation_formats)]
    return table.take(range(len(names)), names, activation_formats)


def expand_weight_matrix(
    table: CandidateTable, weight_names: Sequence[str], matrix: np.ndarray
) -> np.ndarray:
    """Expand a [F_w, F_w] pairwise matrix over weight formats to [C, C] over candidates.

    Pairwise weight terms C_ij(f, g) depend on the weight formats only; every candidate pair
    inherits the term of its two weight formats.
    """
    index = {name: k for k, name in enumerate(weight_names)}
    try:
        rows = [index[name] for name in table.weight_formats]
    except KeyError as error:
        raise InputError(f"pairwise terms have no weight format {error.args[0]!r}") from None
    return np.asarray(matrix)[np.ix_(rows, rows)]


def activation_score_matrix(
    table: CandidateTable, scores_by_format: Mapping[str, np.ndarray]
) -> np.ndarray:
    """[L, C] activation term of every candidate from per-format layer scores ``{format: [L]}``.

    A candidate whose activation format has no entry (e.g. the default assumption, or fp32) adds
    0: unquantized activations add no noise, and an unmeasured default is not penalised.
    """
    result = np.zeros((len(table.layer_names), len(table.format_names)))
    for column, name in enumerate(table.activation_formats):
        if name in scores_by_format:
            values = np.asarray(scores_by_format[name], dtype=float)
            if values.shape != (len(table.layer_names),):
                raise ValueError(
                    f"activation scores for {name} have shape {values.shape}, "
                    f"expected ({len(table.layer_names)},)"
                )
            result[:, column] = values
    return result
