from csm_triton.triton.models.lm import LanguageModel as TritonPythonModel  # noqa: F401
