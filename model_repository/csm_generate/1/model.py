from csm_triton.triton.models.generate import GenerateModel as TritonPythonModel  # noqa: F401
