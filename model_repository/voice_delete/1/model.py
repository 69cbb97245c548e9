"""Thin adapter: all logic lives in csm_triton.voice_models."""

from csm_triton.voice_models import VoiceDeleteModel


class TritonPythonModel(VoiceDeleteModel):
    pass
