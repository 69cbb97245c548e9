"""Triton Python-based backend "onnxruntime" for the embedded tritonserver.

`python -m csm_triton.embedded prepare` copies this file to
`<home>/backends/onnxruntime/model.py`; Triton then serves every model whose config
says `platform: "onnxruntime_onnx"` or `backend: "onnxruntime"` with it (the NGC
container uses its native backend for the same configs). Thin adapter: the logic
is in csm_triton.onnx_runtime_model.
"""

from csm_triton.onnx_runtime_model import OnnxRuntimeModel


class TritonPythonModel(OnnxRuntimeModel):
    pass
