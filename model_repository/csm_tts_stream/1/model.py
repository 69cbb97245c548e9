from csm_triton.triton.models.stream import StreamingModel as TritonPythonModel  # noqa: F401
