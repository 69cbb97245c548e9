"""Thin adapter: all logic lives in csm_triton.voice_models."""

from csm_triton.voice_models import VoiceListModel


class TritonPythonModel(VoiceListModel):
    pass
