"""Thin adapter: all logic lives in csm_triton.prepare_model."""

from csm_triton.prepare_model import PrepareModel


class TritonPythonModel(PrepareModel):
    pass
