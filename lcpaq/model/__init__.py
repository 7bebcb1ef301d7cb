"""Models and data: loading (`zoo`, `demo`), layer discovery (`graph`), calibration and test data
(`data`), statistics correction after quantization (`recovery`) and accuracy (`evaluate`).
Import from the modules.
"""
