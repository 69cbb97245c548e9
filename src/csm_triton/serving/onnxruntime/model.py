from csm_triton.serving.onnxruntime.backend import OnnxRuntimeModel as TritonPythonModel  # noqa: F401
