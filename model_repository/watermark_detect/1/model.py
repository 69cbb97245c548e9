from csm_triton.triton.models.watermark import WatermarkDetectModel as TritonPythonModel  # noqa: F401
