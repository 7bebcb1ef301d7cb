"""The pipeline's stages, one module each, in `lcpaq.stages.pipeline.ORDER`:
analyze → allocate → export → evaluate → sweep → plot → report (``onnx`` optional after export).

Each stage module holds the stage as a function over data (``analyze_model``, ``problem_of`` /
``optimum``, ``export_model``, ``evaluate_models``) and its run-folder wrapper (``analyze``,
``allocate``, ``export``, …) that reads the files earlier stages wrote and writes its own.
`lcpaq.stages.pipeline` gathers the wrappers the CLI calls; `lcpaq.stages.folder` has the shared
run-folder readers; `measure` the analysis' measurements; `figure_style`, `figures`,
`model_curve` and `heatmaps` draw the plot stage's PNGs; `report_sections` renders report.md.
"""
