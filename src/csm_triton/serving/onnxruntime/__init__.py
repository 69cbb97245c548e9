"""ONNX Runtime as a Python-based Triton backend: a pure session wrapper and its adapter."""
