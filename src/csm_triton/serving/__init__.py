"""Serving infrastructure: the embedded tritonserver (install, flags, process, CLI)
and the ONNX Runtime Python-based backend it serves the Mimi models with.
"""
