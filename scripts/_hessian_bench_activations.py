"""The activations section of scripts/bench_hessian.py: the cost of `activation_sensitivity` next
to Gauss–Newton's, and how well its scores predict the measured loss increase of quantizing one
layer's input."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _hessian_bench_common import CHECKPOINTS, SHARED, sync
from scipy.stats import spearmanr

from lcpaq.model.data import load_dataset
from lcpaq.model.graph import discover_layers, get_module
from lcpaq.model.zoo import load_model
from lcpaq.quant.activations import quantize_activation
from lcpaq.sensitivity.activation import activation_scores, activation_sensitivity
from lcpaq.sensitivity.gauss_newton import gauss_newton_traces


def bench_activations(
    name: str, args: argparse.Namespace, device: torch.device
) -> dict[str, object]:
    """`activation_sensitivity` on a checkpoint: its time next to Gauss-Newton's (same batches), and
    how well ½·T_l·σ²_l(f) (and the diagonal form) predicts the measured KL(p_FP ‖ p_Q) when only
    layer l's input is quantized with format f (forward passes on the same images)."""
    model = load_model("cifar-resnet", SHARED / CHECKPOINTS[name]).to(device)
    calib = load_dataset(args.calib, num_classes=10).subset(0, args.num_samples)
    inputs = calib.inputs.to(device)
    layers = discover_layers(model, inputs)
    batches = [inputs[i : i + args.batch_size] for i in range(0, len(inputs), args.batch_size)]
    formats = tuple(args.activation_formats.split(","))
    sync(device)
    start = time.perf_counter()
    gauss_newton_traces(model, layers, batches, keep_diagonal=False)
    sync(device)
    gn_seconds = time.perf_counter() - start
    start = time.perf_counter()
    sensitivity = activation_sensitivity(model, layers, batches, formats, loss="kl")
    sync(device)
    act_seconds = time.perf_counter() - start
    with torch.no_grad():
        reference = torch.cat([torch.log_softmax(model(batch), -1) for batch in batches])
    measured = np.zeros((len(layers), len(formats)))
    for row, layer in enumerate(layers):
        module = get_module(model, layer.name)
        for column, format_name in enumerate(formats):
            low, high = float(sensitivity.low[row]), float(sensitivity.high[row])
            handle = module.register_forward_pre_hook(
                lambda _m, a, f=format_name, lo=low, hi=high: (
                    quantize_activation(a[0], f, lo, hi),
                    *a[1:],
                )
            )
            try:
                with torch.no_grad():
                    log_q = torch.cat([torch.log_softmax(model(batch), -1) for batch in batches])
            finally:
                handle.remove()
            kl = (reference.exp() * (reference - log_q)).sum(-1).mean()
            measured[row, column] = float(kl)
    predicted = {scorer: activation_scores(sensitivity, scorer) for scorer in ("trace", "diagonal")}
    return {
        "model": name,
        "num_samples": len(inputs),
        "formats": list(formats),
        "layers": [layer.name for layer in layers],
        "gauss_newton_seconds": gn_seconds,
        "activation_seconds": act_seconds,
        "activation_over_gauss_newton_time": act_seconds / gn_seconds,
        "activation_trace": sensitivity.trace.tolist(),
        "activation_trace_relative_stderr": (sensitivity.trace_stderr / sensitivity.trace).tolist(),
        "noise_per_element": sensitivity.noise.tolist(),
        "measured_kl": measured.tolist(),
        **{f"predicted_{scorer}": values.tolist() for scorer, values in predicted.items()},
        "spearman_predicted_vs_measured": {
            scorer: {
                "all": float(spearmanr(values.ravel(), measured.ravel()).statistic),
                **{
                    fmt: float(spearmanr(values[:, i], measured[:, i]).statistic)
                    for i, fmt in enumerate(formats)
                },
            }
            for scorer, values in predicted.items()
        },
        "median_measured_over_predicted": {
            scorer: {
                fmt: float(np.median(measured[:, i] / values[:, i]))
                for i, fmt in enumerate(formats)
            }
            for scorer, values in predicted.items()
        },
    }
