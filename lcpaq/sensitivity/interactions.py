"""Inter-layer dependency terms between quantized layers (METHOD §1c, §1c').

For candidate formats f (layer i) and g (layer j), with Δw_l(f) = Q_f(W_l) − W_l:

* ``hessian_cross_terms(..., curvature="hessian")``: C_ij(f, g) = Δw_i(f)ᵀ H_ij Δw_j(g) of the mean
  cross-entropy. One HVP with Δw_j(g) placed on layer j gives H_{·j}Δw_j(g) for every partner i at
  once, so the cost is one HVP per (layer, format) and batch. Standard errors are over batches.
* ``hessian_cross_terms(..., curvature="gauss_newton")``: the same with G = (1/N) Σ_n J_nᵀH_out,nJ_n.
  One forward-mode product (JVP) per (layer, format) gives each sample's logit change
  dz_n = J_n,jΔw_j; every pair is then dz_n,iᵀ H_out,n dz_n,j, so standard errors are per sample.
* ``measured_interactions``: C_ij(f, g) = δ_ij(f, g) − δ_i(f) − δ_j(g) from forward passes with the
  quantized weights on one fixed sample (CLADO), common random numbers for the four terms and
  per-sample standard errors. Exact for the pair, no quadratic model.

Pairs (i < j, indices in the execution order of `lcpaq.model.graph.discover_layers`) come from
`select_pairs`. Results are plain numpy (`InteractionTerms`), saved as ``interactions.npz``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lcpaq.model.graph import LayerInfo, get_module
from lcpaq.quant.formats import QuantScheme, get_format
from lcpaq.quant.weights import fake_quantize_formats

Pair = tuple[int, int]
PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


def weight_perturbations(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    format_names: Sequence[str],
    scheme: QuantScheme,
    input_hessians: Mapping[str, torch.Tensor] | None = None,
) -> list[list[torch.Tensor]]:
    """Δw[l][f] = Q_f(W_l) − W_l, on the weight's device and dtype (``input_hessians``: what GPTQ
    rounding needs, see `lcpaq.quant.weights.quantize_weight`)."""
    result = []
    for layer in layers:
        weight = get_module(model, layer.name).weight.detach()
        hessian = input_hessians.get(layer.name) if input_hessians else None
        result.append(
            [
                quantized - weight
                for quantized in fake_quantize_formats(
                    weight, [get_format(name) for name in format_names], scheme, hessian
                )
            ]
        )
    return result


def _check_pairs(pairs: Sequence[Pair], num_layers: int) -> tuple[Pair, ...]:
    checked = tuple(sorted({(int(i), int(j)) for i, j in pairs}))
    for i, j in checked:
        if not 0 <= i < j < num_layers:
            raise ValueError(f"pair {(i, j)} must satisfy 0 <= i < j < {num_layers}")
    return checked


def _mean_and_stderr(
    sums: np.ndarray, squares: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray]:
    mean = sums / count
    if count < 2:
        return mean, np.full_like(mean, np.nan)
    variance = np.maximum(squares / count - mean**2, 0.0) * count / (count - 1)
    return mean, np.sqrt(variance / count)


# -- curvature products ----------------------------------------------------------------------------


def hessian_cross_terms(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    format_names: Sequence[str],
    *,
    scheme: QuantScheme | None = None,
    pairs: Sequence[Pair] | None = None,
    curvature: Literal["hessian", "gauss_newton"] = "hessian",
    loss: Literal["cross_entropy", "mse"] = "cross_entropy",
    input_hessians: Mapping[str, torch.Tensor] | None = None,
) -> InteractionTerms:
    """C_ij(f, g) = Δw_i(f)ᵀ M_ij Δw_j(g) with M the Hessian or Gauss–Newton matrix of the mean loss.

    Args:
        model: FP32 model (put in eval mode); its weights are not changed.
        layers: layers from `lcpaq.model.graph.discover_layers`; pair indices refer to this order.
        batches: (inputs, labels) on any device; labels are used by the exact Hessian only
            (the Gauss–Newton matrix of cross-entropy does not depend on them).
        format_names: candidate formats, e.g. ``("int2", "int4")``.
        scheme: the quantizer (default `QuantScheme()`).
        pairs: (i, j) with i < j; default ``select_pairs(len(layers))`` (window of 3).
        curvature: ``hessian`` (SE over batches, NaN with one batch) or ``gauss_newton`` (SE over
            samples).
        loss: ``cross_entropy`` or, for ``gauss_newton`` only, ``mse`` (mean over outputs).
        input_hessians: per-layer input second moments, for ``scheme.rounding == "gptq"``.
    Returns:
        `InteractionTerms` with ``diagonal[l, f] = Δw_l(f)ᵀ M_ll Δw_l(f)``.
    """
    model.eval()
    scheme = scheme or QuantScheme()
    pairs = _check_pairs(pairs if pairs is not None else select_pairs(len(layers)), len(layers))
    deltas = weight_perturbations(model, layers, format_names, scheme, input_hessians)
    if curvature == "hessian":
        if loss != "cross_entropy":
            raise ValueError("the exact Hessian cross terms support loss='cross_entropy' only")
        means, errors, count = _hessian_products(model, layers, batches, deltas, pairs)
    elif curvature == "gauss_newton":
        means, errors, count = _gauss_newton_products(model, layers, batches, deltas, pairs, loss)
    else:
        raise ValueError(f"curvature must be 'hessian' or 'gauss_newton', got {curvature!r}")
    num_formats = len(format_names)
    diagonal = np.array([np.diagonal(means[(k, k)]) for k in range(len(layers))])
    diagonal_stderr = np.array([np.diagonal(errors[(k, k)]) for k in range(len(layers))])
    return InteractionTerms(
        layer_names=tuple(layer.name for layer in layers),
        format_names=tuple(format_names),
        cross={pair: means[pair] for pair in pairs},
        stderr={pair: errors[pair] for pair in pairs},
        diagonal=diagonal.reshape(len(layers), num_formats),
        diagonal_stderr=diagonal_stderr.reshape(len(layers), num_formats),
        method=curvature,
        num_samples=count,
    )


def _hessian_products(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    deltas: list[list[torch.Tensor]],
    pairs: tuple[Pair, ...],
) -> tuple[dict, dict, int]:
    """Mean-loss terms and standard errors over batches.

    Each batch gives its own estimate Δw_iᵀ H_ij^(b) Δw_j of its mean loss; weighted by batch size
    they average to the term of the mean loss over all samples, and their spread gives the SE.
    """
    weights = [get_module(model, layer.name).weight for layer in layers]
    flags = [weight.requires_grad for weight in weights]
    partners: dict[int, list[int]] = {j: [j] for j in range(len(layers))}
    for i, j in pairs:
        partners[j].append(i)
    sums: dict[Pair, np.ndarray] = {}
    squares: dict[Pair, np.ndarray] = {}
    num_formats = len(deltas[0])
    count = num_batches = 0
    for weight in weights:
        weight.requires_grad_(True)
    try:
        for inputs, labels in batches:
            device = weights[0].device
            inputs, labels = inputs.to(device), labels.to(device)
            batch_loss = F.cross_entropy(model(inputs), labels)
            grads = torch.autograd.grad(batch_loss, weights, create_graph=True)
            values: dict[Pair, np.ndarray] = {}
            for j, others in partners.items():
                for g in range(num_formats):
                    products = torch.autograd.grad(
                        grads[j],
                        [weights[i] for i in others],
                        grad_outputs=deltas[j][g],
                        retain_graph=True,
                        allow_unused=True,
                    )
                    for i, product in zip(others, products):
                        block = values.setdefault((i, j), np.zeros((num_formats, num_formats)))
                        if product is None:  # layer i does not reach layer j's gradient
                            continue
                        for f in range(num_formats):
                            block[f, g] = float((deltas[i][f] * product).sum())
            del grads, batch_loss
            size = int(inputs.shape[0])
            for pair, block in values.items():
                sums[pair] = sums.get(pair, 0.0) + size * block
                squares[pair] = squares.get(pair, 0.0) + size * block**2
            count += size
            num_batches += 1
    finally:
        for weight, flag in zip(weights, flags):
            weight.requires_grad_(flag)
    if count == 0:
        raise ValueError("no calibration samples were given")
    means = {pair: value / count for pair, value in sums.items()}
    errors = {}
    for pair, mean in means.items():  # sample-size-weighted spread of the batch estimates
        spread = np.maximum(squares[pair] / count - mean**2, 0.0)
        errors[pair] = (
            np.sqrt(spread / (num_batches - 1)) if num_batches > 1 else np.full_like(mean, np.nan)
        )
    return means, errors, count


def _gauss_newton_products(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    deltas: list[list[torch.Tensor]],
    pairs: tuple[Pair, ...],
    loss: str,
) -> tuple[dict, dict, int]:
    """Per-sample sums of dz_iᵀ H_out dz_j with dz = J Δw from one JVP per (layer, format)."""
    wanted = [(k, k) for k in range(len(layers))] + list(pairs)
    sums: dict[Pair, np.ndarray] = {}
    squares: dict[Pair, np.ndarray] = {}
    count = 0
    device = deltas[0][0].device
    for batch in batches:
        inputs = (batch[0] if isinstance(batch, (tuple, list)) else batch).to(device)
        changes = []  # changes[l][f]: [N, C] logit change J_l Δw_l(f)
        for layer, layer_deltas in zip(layers, deltas):
            weight = get_module(model, layer.name).weight.detach()
            key = layer.weight_key

            def logits_of(
                w: torch.Tensor, key: str = key, inputs: torch.Tensor = inputs
            ) -> torch.Tensor:
                return torch.func.functional_call(model, {key: w}, (inputs,))

            per_format = []
            for delta in layer_deltas:
                logits, change = torch.func.jvp(logits_of, (weight,), (delta,))
                per_format.append(change.detach())
            changes.append(torch.stack(per_format))  # [F, N, C]
        logits = logits.detach()
        num_classes = logits.shape[-1]
        if loss == "mse":
            weighted = [(2.0 / num_classes) * change for change in changes]
            projections = None
        else:
            probs = torch.softmax(logits, dim=-1)
            weighted = [probs * change for change in changes]
            projections = [(change * probs).sum(-1) for change in changes]  # [F, N]
        for i, j in wanted:
            per_sample = torch.einsum("fnc,gnc->nfg", weighted[i], changes[j])
            if projections is not None:
                per_sample = per_sample - projections[i].T[:, :, None] * projections[j].T[:, None]
            values = per_sample.double().cpu().numpy()
            sums[(i, j)] = sums.get((i, j), 0.0) + values.sum(0)
            squares[(i, j)] = squares.get((i, j), 0.0) + (values**2).sum(0)
        count += inputs.shape[0]
    if count == 0:
        raise ValueError("no calibration samples were given")
    means, errors = {}, {}
    for pair in sums:
        means[pair], errors[pair] = _mean_and_stderr(sums[pair], squares[pair], count)
    return means, errors, count


# -- forward-measured interactions -----------------------------------------------------------------


@contextmanager
def _weights_replaced(
    modules: dict[int, nn.Module], new: dict[int, torch.Tensor]
) -> Iterator[None]:
    saved = {index: modules[index].weight.detach().clone() for index in new}
    try:
        with torch.no_grad():
            for index, weight in new.items():
                modules[index].weight.copy_(weight)
        yield
    finally:
        with torch.no_grad():
            for index, weight in saved.items():
                modules[index].weight.copy_(weight)


def measured_interactions(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    inputs: torch.Tensor,
    labels: torch.Tensor | None,
    format_names: Sequence[str],
    *,
    scheme: QuantScheme | None = None,
    pairs: Sequence[Pair] | None = None,
    loss: Literal["cross_entropy", "kl"] | PerSampleLoss = "cross_entropy",
    batch_size: int = 256,
    input_hessians: Mapping[str, torch.Tensor] | None = None,
) -> InteractionTerms:
    """C_ij(f, g) = δ_ij(f, g) − δ_i(f) − δ_j(g) measured by forward passes on one fixed sample.

    Per sample n, c_n = ℓ_n(i@f, j@g) − ℓ_n(i@f) − ℓ_n(j@g) + ℓ_n(FP32); the term is the mean of c_n
    and its standard error std(c_n)/√N (the same samples for all four losses, so shared noise
    cancels). Cost: L·F + |pairs|·F² forward passes over the sample.

    Args:
        loss: ``cross_entropy`` (needs labels), ``kl`` (KL(p_FP32 ‖ p_Q), label-free) or a callable
            ``(logits, labels) -> per-sample losses [N]``.
    Returns:
        `InteractionTerms` with ``method="measured"`` and ``diagonal[l, f] = δ_l(f)``.
    """
    model.eval()
    scheme = scheme or QuantScheme()
    pairs = _check_pairs(pairs if pairs is not None else select_pairs(len(layers)), len(layers))
    modules = {index: get_module(model, layer.name) for index, layer in enumerate(layers)}
    device = modules[0].weight.device
    inputs = inputs.to(device)
    labels = labels.to(device) if labels is not None else None
    quantized = [
        [delta + modules[k].weight.detach() for delta in per_layer]
        for k, per_layer in enumerate(
            weight_perturbations(model, layers, format_names, scheme, input_hessians)
        )
    ]

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat(
                [model(inputs[s : s + batch_size]) for s in range(0, len(inputs), batch_size)]
            )

    reference = forward()

    def losses(logits: torch.Tensor) -> np.ndarray:
        if callable(loss):
            values = loss(logits, labels)
        elif loss == "cross_entropy":
            if labels is None:
                raise ValueError("loss='cross_entropy' needs labels; use loss='kl' without them")
            values = F.cross_entropy(logits, labels, reduction="none")
        elif loss == "kl":
            reference_log = torch.log_softmax(reference, -1)
            values = (reference_log.exp() * (reference_log - torch.log_softmax(logits, -1))).sum(-1)
        else:
            raise ValueError(f"loss must be 'cross_entropy', 'kl' or a callable, got {loss!r}")
        return values.double().cpu().numpy()

    base = losses(reference)
    num_formats = len(format_names)
    single = np.zeros((len(layers), num_formats, len(base)))  # ℓ_n(l@f) − ℓ_n(FP32)
    for k in range(len(layers)):
        for f in range(num_formats):
            with _weights_replaced(modules, {k: quantized[k][f]}):
                single[k, f] = losses(forward()) - base
    cross, stderr = {}, {}
    for i, j in pairs:
        block = np.zeros((num_formats, num_formats))
        error = np.zeros((num_formats, num_formats))
        for f in range(num_formats):
            for g in range(num_formats):
                with _weights_replaced(modules, {i: quantized[i][f], j: quantized[j][g]}):
                    per_sample = losses(forward()) - base - single[i, f] - single[j, g]
                block[f, g] = per_sample.mean()
                error[f, g] = per_sample.std(ddof=1) / np.sqrt(len(per_sample))
        cross[(i, j)], stderr[(i, j)] = block, error
    return InteractionTerms(
        layer_names=tuple(layer.name for layer in layers),
        format_names=tuple(format_names),
        cross=cross,
        stderr=stderr,
        diagonal=single.mean(-1),
        diagonal_stderr=single.std(-1, ddof=1) / np.sqrt(single.shape[-1]),
        method="measured",
        num_samples=len(base),
    )


# -- one entry point for the pipeline --------------------------------------------------------------


def pair_formats(format_names: Sequence[str], max_bits: int) -> tuple[str, ...]:
    """The candidate formats whose cross terms are measured: at most ``max_bits`` bits per code.

    Cross terms scale like the product of the two layers' weight errors (about 2^-(b_i + b_j)), so
    wide formats contribute little and the allocation treats their terms as 0; measuring only the
    narrow formats cuts the forward-measured cost by (F / F_narrow)² (36 → 9 blocks for INT2–8).
    """
    return tuple(name for name in format_names if get_format(name).bits <= max_bits)


def compute_interactions(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    inputs: torch.Tensor,
    labels: torch.Tensor | None,
    format_names: Sequence[str],
    *,
    source: PairSource,
    pairs: Sequence[Pair],
    scheme: QuantScheme | None = None,
    batch_size: int = 64,
    curvature_loss: Literal["cross_entropy", "mse"] = "cross_entropy",
    forward_loss: Literal["cross_entropy", "kl"] = "kl",
    input_hessians: Mapping[str, torch.Tensor] | None = None,
) -> InteractionTerms:
    """Inter-layer terms from ``source`` (``hessian``, ``gauss-newton`` or ``forward``).

    The curvature sources split ``inputs`` into batches of ``batch_size`` (the exact Hessian's
    standard error is over these batches, so give at least two); ``forward`` measures on all of
    ``inputs`` at once with ``forward_loss`` (``kl``: label-free KL to the FP32 outputs, default).
    """
    if source == "forward":
        return measured_interactions(
            model,
            layers,
            inputs,
            labels,
            format_names,
            scheme=scheme,
            pairs=pairs,
            loss=forward_loss,
            batch_size=max(batch_size, 256),
            input_hessians=input_hessians,
        )
    if source not in ("hessian", "gauss-newton"):
        raise ValueError(
            f"pairwise source must be one of {', '.join(PAIR_SOURCES[1:])}, got {source!r}"
        )
    batches = [
        (
            inputs[start : start + batch_size],
            None if labels is None else labels[start : start + batch_size],
        )
        for start in range(0, len(inputs), batch_size)
    ]
    if source == "hessian" and labels is None:
        raise ValueError("Hessian cross terms need labels (use gauss-newton or forward without)")
    return hessian_cross_terms(
        model,
        layers,
        batches,  # type: ignore[arg-type]
        format_names,
        scheme=scheme,
        pairs=pairs,
        curvature="hessian" if source == "hessian" else "gauss_newton",
        loss=curvature_loss,
        input_hessians=input_hessians,
    )


# -- files -------------------------------------------------------------------------------------------


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
