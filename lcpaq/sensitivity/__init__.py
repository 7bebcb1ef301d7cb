"""Sensitivity measurement: what the analyze stage measures on calibration data (needs torch).

Curvature of the loss per layer (``curvature.npz``, result type `curvature.CurvatureEstimate`):
  gauss_newton     exact per-layer Gauss–Newton traces with standard errors over samples (default);
                   the one trace loop for one process and for torchrun (through a `BatchShare`)
  hutchinson       Hutchinson traces of the exact Hessian: joint probes (cross-check) and
                   single-layer probes with the Gauss–Newton control variate (``--estimator``)
  pyhessian_check  PyHessian's whole-model trace and top eigenvalue (``pyhessian.json``)
  losses           losses on the logits, their output-Hessian factors, one backward per factor
  per_sample       per-sample weight gradients from recorded layer inputs and output gradients
  batch_share      which batches a process computes and how partial results are combined
  distributed      torchrun: the process group and this process's `BatchShare`
  activation       curvature with respect to each layer's input activation (one or many processes)
  activation_file  ``activations.npz``: save and load the activation sensitivity
Inter-layer terms (``interactions.npz``):
  interactions     `compute_interactions`, the entry point over the sources below, and pair formats
  interaction_terms  `InteractionTerms`, pair selection, the file (numpy only)
  cross_terms      Δwᵀ H Δw and Δwᵀ G Δw cross terms; measured_interactions: forward-measured terms
Candidates (``candidates.npz``):
  candidates       the per-layer score and cost of every candidate format
"""
