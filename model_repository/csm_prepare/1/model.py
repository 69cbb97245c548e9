from csm_triton.triton.models.prepare import PrepareModel as TritonPythonModel  # noqa: F401
