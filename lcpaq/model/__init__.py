"""Models and data: loading (`zoo`, `demo`), layer discovery (`graph`), calibration and test data
(`data`, `text_data`), statistics correction after quantization (`recovery`) and the metrics:
accuracy, retrieval recall, perplexity (`evaluate`).
Import from the modules.
"""
