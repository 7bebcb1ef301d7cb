"""Number formats and quantizers: what a layer's weights and inputs become.

`formats` (the registry of bit layouts, schemes) ← `rounding` (round to nearest, clipping) ←
`weights` (weight codes and scales) / `gptq` (GPTQ rounding) / `activations` (static activation
quantization); `checkpoint` writes and reads the export stage's quantized checkpoint,
`qdq_graph` and `onnx_qdq` turn it into an ONNX QDQ model. Import from the modules.
"""
