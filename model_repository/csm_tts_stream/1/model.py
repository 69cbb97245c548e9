"""Thin adapter: all logic lives in csm_triton.stream_model."""

from csm_triton.stream_model import StreamingModel


class TritonPythonModel(StreamingModel):
    pass
