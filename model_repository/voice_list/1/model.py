from csm_triton.triton.models.voices import VoiceListModel as TritonPythonModel  # noqa: F401
