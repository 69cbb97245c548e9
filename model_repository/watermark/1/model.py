"""Thin adapter: all logic lives in csm_triton.watermark_models."""

from csm_triton.watermark_models import WatermarkModel


class TritonPythonModel(WatermarkModel):
    pass
