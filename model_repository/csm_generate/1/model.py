"""Thin adapter: all logic lives in csm_triton.generate_model."""

from csm_triton.generate_model import GenerateModel


class TritonPythonModel(GenerateModel):
    pass
