"""Deployment exports of a quantized graph (ONNX Q/DQ) and their verification."""
