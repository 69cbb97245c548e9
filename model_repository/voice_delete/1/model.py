from csm_triton.triton.models.voices import VoiceDeleteModel as TritonPythonModel  # noqa: F401
