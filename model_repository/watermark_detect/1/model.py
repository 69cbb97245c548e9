"""Thin adapter: all logic lives in csm_triton.watermark_models."""

from csm_triton.watermark_models import WatermarkDetectModel


class TritonPythonModel(WatermarkDetectModel):
    pass
