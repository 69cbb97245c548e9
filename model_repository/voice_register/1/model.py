from csm_triton.triton.models.voices import VoiceRegisterModel as TritonPythonModel  # noqa: F401
