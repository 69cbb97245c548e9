"""Thin adapter: all logic lives in csm_triton.lm_model."""

from csm_triton.lm_model import LanguageModel


class TritonPythonModel(LanguageModel):
    pass
